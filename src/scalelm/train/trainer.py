"""The training loop. Follow one step top to bottom in `train_step`: batch → forward → loss → backward
(per micro-batch) → clip → schedule → optimizer step → zero grad. Everything stateful (model, optimizers,
loader, step) is saved by one checkpoint call and restored by one load.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scalelm.config import Config
from scalelm.data import BatchLoader, eval_batches
from scalelm.model.sample import sample
from scalelm.train.checkpoint import save_checkpoint, state_sha256, unique_state
from scalelm.train.metrics import MetricsLogger, now
from scalelm.train.optim import lr_factor, set_lr

LN2 = math.log(2.0)


@dataclass
class Precision:
    """How the forward runs: autocast dtype (None = fp32) and whether a GradScaler guards fp16 gradients."""

    name: str
    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None = None

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    if requested == "auto":
        if device.type == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            # CPUs with AVX512-BF16/AMX run bf16 matmuls about twice as fast as fp32 (docs/benchmarks.md).
            requested = "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    if requested == "fp32":
        return Precision("fp32", None)
    if requested == "bf16":
        return Precision("bf16", torch.bfloat16)
    if device.type != "cuda":
        raise ValueError("train.dtype=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    return Precision("fp16", torch.float16, torch.amp.GradScaler("cuda"))


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kib / 2**20 if sys.platform != "darwin" else peak_kib / 2**30


class Trainer:
    def __init__(self, cfg: Config, model: nn.Module, optimizers: list[torch.optim.Optimizer], loader: BatchLoader,
                 val_tokens, tokenizer, run_dir: Path, device: torch.device, precision: Precision,
                 logger: MetricsLogger, peak_flops: float | None):
        self.cfg, self.model, self.optimizers, self.loader = cfg, model, optimizers, loader
        self.tokenizer, self.run_dir, self.device, self.precision = tokenizer, run_dir, device, precision
        self.logger, self.peak_flops = logger, peak_flops
        self.step = 0
        t = cfg.train
        self.local_batch = t.global_batch // loader.dp_size
        self.micro_batch = t.micro_batch or self.local_batch
        self.tokens_per_step = t.global_batch * t.seq_len  # the loss is normalized by the GLOBAL token count
        self.flops_per_token = model.flops_per_token(t.seq_len)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.val_batches = eval_batches(val_tokens, t.seq_len, min(t.global_batch, 32), t.eval_batches)
        self.last_val_loss: float | None = None

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loader": self.loader.state_dict(), "last_val_loss": self.last_val_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        self.last_val_loss = state.get("last_val_loss")

    # ---- one optimizer step -------------------------------------------------------------------------
    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        x, y = self.loader.next_batch()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        loss_sum = torch.zeros((), device=self.device)
        for xm, ym in zip(x.split(self.micro_batch), y.split(self.micro_batch)):
            with self.precision.autocast(self.device):
                logits = self.model(xm)
            # sum over tokens / global tokens: k micro-batches of b give exactly the gradient of one batch of k·b
            loss = F.cross_entropy(logits.float().flatten(0, 1), ym.flatten(), reduction="sum") / self.tokens_per_step
            scaled = self.precision.scaler.scale(loss) if self.precision.scaler else loss
            scaled.backward()
            loss_sum += loss.detach()
        if self.precision.scaler:
            for opt in self.optimizers:
                self.precision.scaler.unscale_(opt)
        grad_norm = self.clip_gradients()
        lr = set_lr(self.optimizers, lr_factor(self.cfg.optim, self.step, self.cfg.train.steps))
        for opt in self.optimizers:
            if self.precision.scaler:
                self.precision.scaler.step(opt)
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
        if self.precision.scaler:
            self.precision.scaler.update()
        self.step += 1
        return loss_sum, grad_norm, lr

    def clip_gradients(self) -> torch.Tensor:
        """Scale all gradients so their global L2 norm is at most optim.grad_clip; returns the pre-clip norm."""
        clip = self.cfg.optim.grad_clip or float("inf")
        return torch.nn.utils.clip_grad_norm_(self.params, clip)

    # ---- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = 0.0
        for x, y in self.val_batches:
            x, y = x.to(self.device), y.to(self.device)
            with self.precision.autocast(self.device):
                logits = self.model(x)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item()
        self.model.train()
        return total / len(self.val_batches)

    def sample_text(self, n_tokens: int) -> str:
        """A sample from a fixed prompt with its own generator, so sampling never shifts the training RNG."""
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.step)
        prompt = torch.tensor([self.tokenizer.encode("\n")], device=self.device)
        with self.precision.autocast(self.device):
            out = sample(self.model, prompt, n_tokens, generator=gen, vocab_limit=self.tokenizer.vocab_size)
        return self.tokenizer.decode(out[0, 1:].tolist())

    def eval_and_log(self) -> float:
        val_loss = self.evaluate()
        self.last_val_loss = val_loss
        record: dict[str, Any] = {"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                                  "val_bits_per_token": val_loss / LN2}
        if self.cfg.train.sample_tokens:
            record["sample"] = self.sample_text(self.cfg.train.sample_tokens)
        self.logger.log(record)
        self.logger.print(f"step {self.step}: val loss {val_loss:.4f} (ppl {record['val_ppl']:.2f}, "
                          f"{record['val_bits_per_token']:.3f} bits/token)")
        if "sample" in record:
            self.logger.print("---- sample ----\n" + record["sample"].strip() + "\n----------------")
        return val_loss

    # ---- the loop -----------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        t, ck = self.cfg.train, self.cfg.checkpoint
        interval_start, interval_steps = now(), 0
        while self.step < t.steps:
            step_start = now()
            loss, grad_norm, lr = self.train_step()
            interval_steps += 1
            if self.step % t.log_every == 0 or self.step == t.steps:
                loss_value = loss.item()  # .item() syncs with the device: only on log steps
                elapsed = now() - interval_start
                tokens_per_s = interval_steps * self.tokens_per_step / elapsed
                self.logger.log({
                    "step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(),
                    "tokens_per_s": tokens_per_s, "step_time_s": elapsed / interval_steps,
                    "mfu": self.flops_per_token * tokens_per_s / self.peak_flops if self.peak_flops else None,
                    "mem_gib": memory_gib(self.device),
                })
                self.logger.advance(self.step, f"loss {loss_value:.4f}  {tokens_per_s:,.0f} tok/s")
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss is {loss_value} at step {self.step}; lower optim.lr or "
                                             f"raise optim.warmup_steps")
                interval_start, interval_steps = now(), 0
            else:
                self.logger.advance(self.step, f"{now() - step_start:.2f} s/step")
            pause = now()
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                self.eval_and_log()
            if ck.every and self.step % ck.every == 0 and self.step < t.steps:
                save_checkpoint(self.run_dir, self.step, self.model, self.optimizers, self.state_dict(), ck.keep)
            interval_start += now() - pause  # evaluation and checkpoints do not count as training time
        val_loss = self.eval_and_log()
        save_checkpoint(self.run_dir, self.step, self.model, self.optimizers, self.state_dict(), ck.keep)
        end = {"event": "end", "step": self.step, "val_loss": val_loss,
               "params_sha256": state_sha256(unique_state(self.model))}
        self.logger.log(end)
        return end
