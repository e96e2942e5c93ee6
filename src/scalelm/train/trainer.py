"""The training loop. Follow one step top to bottom in `train_step`: batch → forward → loss → backward
(per micro-batch, or one pipeline schedule) → clip → schedule → optimizer step → zero grad. Everything stateful
(model, optimizers, loader, step) is saved by one checkpoint call and restored by one load.

A distributed run (`parallel` is not None) runs the same loop on every rank: this rank's slice of the global
batch, this rank's model part(s); the loss is still the sum over tokens divided by the GLOBAL token count, so
summing it over data-parallel ranks and pipeline stages gives the single-process loss. Only rank 0's logger writes.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from scalelm.config import Config
from scalelm.data import BatchLoader, eval_batches
from scalelm.model.counting import flops_per_token
from scalelm.model.sample import sample
from scalelm.parallel.comm import CommCounter
from scalelm.parallel.fingerprint import sharded_sha256
from scalelm.parallel.parallelize import Parallel, clip_grad_norm_, rank0_choice, unwrap
from scalelm.train import budget
from scalelm.train.checkpoint import save_checkpoint, save_distributed_checkpoint, state_sha256, unique_state
from scalelm.train.guard import NonFiniteError, injected_batches
from scalelm.train.metrics import MetricsLogger, now
from scalelm.train.optim import lr_factor, set_lr
from scalelm.train.precision import Precision

LN2 = math.log(2.0)
EVAL_ROWS = 32
"""Validation windows per evaluation batch (train.eval_batches of them), or the training batch if smaller."""


def eval_rows(global_batch: int) -> int:
    """Windows per evaluation batch: EVAL_ROWS, or the training batch when smaller (memory sized for it, and the
    end of a run sized like its middle). Runs with the same batch (any batch from EVAL_ROWS up) see the same
    windows, so their val losses compare."""
    return min(EVAL_ROWS, global_batch)


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak_kib / 2**20 if sys.platform != "darwin" else peak_kib / 2**30


def token_loss(logits: torch.Tensor, targets: torch.Tensor, tokens_per_step: int, tp_mesh=None) -> torch.Tensor:
    """Sum of token cross-entropies / global tokens: k micro-batches of b (on any number of ranks) give
    exactly the gradient of one batch of k·b. Under TP the logits are this rank's vocabulary shard: as a
    DTensor(Shard(-1)), cross-entropy under `loss_parallel` never gathers them."""
    if tp_mesh is not None:
        logits = DTensor.from_local(logits, tp_mesh, [Shard(-1)], run_check=False)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum") / tokens_per_step


def _plain(t: torch.Tensor) -> torch.Tensor:
    """A loss computed by loss_parallel is a replicated DTensor; its local value is the loss."""
    return t.to_local() if hasattr(t, "to_local") else t


class Trainer:
    parallel: Parallel | None = None  # None: one process, the plain model

    def __init__(self, cfg: Config, model: nn.Module | None, optimizers: list[torch.optim.Optimizer],
                 loader: BatchLoader, val_tokens, tokenizer, run_dir: Path, device: torch.device, precision: Precision,
                 logger: MetricsLogger, peak_flops: float | None, parallel: Parallel | None = None,
                 prediction: dict[str, Any] | None = None):
        self.cfg, self.model, self.optimizers, self.loader = cfg, model, optimizers, loader
        self.tokenizer, self.run_dir, self.device, self.precision = tokenizer, run_dir, device, precision
        self.logger, self.peak_flops, self.parallel = logger, peak_flops, parallel
        self.prediction = prediction or {}  # the perf model's step_time_s and peak_mem_gib (train/forecast.py)
        self.step_times: list[float] = []  # step_time_s of this process's logged intervals, for the drift
        self.pipeline = parallel.schedule if parallel is not None else None  # None: `model` runs the whole forward
        self.step = 0
        t = cfg.train
        self.local_batch = t.global_batch // loader.dp_size
        # A pipeline splits the local batch itself (its micro-batch count comes from train.micro_batch or
        # parallel.pp_microbatches, resolved by validate_parallel): no gradient accumulation on top.
        self.micro_batch = self.local_batch if self.pipeline is not None else (t.micro_batch or self.local_batch)
        self.tokens_per_step = t.global_batch * t.seq_len  # the loss is normalized by the GLOBAL token count
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.params = parallel.norm_params() if parallel else [p for p in model.parameters() if p.requires_grad]
        # The same windows at every evaluation: eval_batches batches of eval_rows(global_batch) windows, never
        # more than a training batch, so an evaluation batch costs a third of a step (a forward, no backward).
        self.val_batches = eval_batches(val_tokens, t.seq_len, eval_rows(t.global_batch), t.eval_batches)
        self.last_val_loss: float | None = None
        self.budget_steps: int | None = None  # the run's length once train.time_budget_min has fixed it
        self.nonfinite_steps, self.nonfinite_in_a_row = 0, 0  # skipped steps: in all, and since the last good one
        self.nan_batches = injected_batches()  # test hook (train/guard.py); empty in real runs

    @property
    def total_steps(self) -> int:
        return min(self.cfg.train.steps, self.budget_steps) if self.budget_steps else self.cfg.train.steps

    # ---- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "loader": self.loader.state_dict(), "last_val_loss": self.last_val_loss,
                "budget_steps": self.budget_steps, "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        self.last_val_loss = state.get("last_val_loss")
        self.budget_steps = state.get("budget_steps")
        self.nonfinite_steps = state.get("nonfinite_steps", 0)

    # ---- one optimizer step -------------------------------------------------------------------------
    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return token_loss(logits, targets, self.tokens_per_step, self.parallel.tp_mesh if self.parallel else None)

    def forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One micro-batch's share of the step loss. A trainer for another objective (distillation, a
        classification head) overrides this and keeps the rest of the loop."""
        with self.precision.autocast(self.device):
            logits = self.model(x)
        return self.loss_fn(logits, y)

    def loss_context(self):
        return self.parallel.loss_context() if self.parallel is not None else contextlib.nullcontext()

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        x, y = self.loader.next_batch()  # this data-parallel rank's rows of the global batch
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.pipeline is not None:
            loss_sum = self.pipeline_step(x, y)
        else:
            loss_sum = torch.zeros((), device=self.device)
            micro = list(zip(x.split(self.micro_batch), y.split(self.micro_batch)))
            for i, (xm, ym) in enumerate(micro):
                with self.grad_sync(last=i == len(micro) - 1), self.loss_context():
                    loss = self.forward_loss(xm, ym)
                    scaled = self.precision.scaler.scale(loss) if self.precision.scaler else loss
                    scaled.backward()
                loss_sum += _plain(loss.detach())
        if self.loader.step in self.nan_batches:  # test hook: this batch's loss and gradients become NaN
            loss_sum.fill_(float("nan"))
            for p in self.params:
                if p.grad is not None:
                    p.grad.fill_(float("nan"))
        if self.precision.scaler:
            for opt in self.optimizers:
                self.precision.scaler.unscale_(opt)
        grad_norm = self.clip_gradients()
        if self.precision.scaler is None and not self.finite(loss_sum, grad_norm):  # (fp16: the scaler skips)
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            self.skip_step(loss_sum, grad_norm)
            return loss_sum, grad_norm, float("nan")
        self.nonfinite_in_a_row = 0
        lr = set_lr(self.optimizers, lr_factor(self.cfg.optim, self.step, self.total_steps))
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

    def finite(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> bool:
        """Whether this step's gradient norm (and, in one process, loss) is finite: one sync with the device. A
        distributed run decides on the norm alone, which is global (identical on every rank, and non-finite as soon
        as any rank's loss is), so all ranks skip the same steps without a collective of their own."""
        ok = torch.isfinite(_plain(grad_norm))
        if self.parallel is None:
            ok &= torch.isfinite(_plain(loss_sum))
        return bool(ok)

    def skip_step(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Log and count a skipped step: parameters, optimizer states and the schedule (self.step) are unchanged,
        the batch is consumed. One step more than train.max_nonfinite_steps in a row stops the run."""
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        attempted = self.step + 1
        self.logger.log({"event": "nonfinite", "step": attempted, "batch": self.loader.step,
                         "loss": _plain(loss_sum).item(), "grad_norm": _plain(grad_norm).item(),
                         "skipped_total": self.nonfinite_steps})
        self.logger.print(f"step {attempted}: non-finite loss or gradient norm; batch {self.loader.step} skipped "
                          f"({self.nonfinite_in_a_row} in a row, {self.nonfinite_steps} in all)")
        limit = self.cfg.train.max_nonfinite_steps
        if self.nonfinite_in_a_row > limit:
            raise NonFiniteError(f"{self.nonfinite_in_a_row} steps in a row (from step {attempted}) had a non-finite "
                                 f"loss or gradient norm, more than train.max_nonfinite_steps={limit}; the last "
                                 f"checkpoint is intact: lower optim.lr or raise optim.warmup_steps, then run the "
                                 f"same command to resume")

    def pipeline_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One schedule runs forward and backward of all pipeline micro-batches; the last stage computes the loss."""
        losses: list[torch.Tensor] = []
        target = y if self.parallel.has_last_stage else None
        with self.loss_context(), self.precision.autocast(self.device):
            if self.parallel.has_first_stage:
                self.pipeline.step(x, target=target, losses=losses)
            else:
                self.pipeline.step(target=target, losses=losses)
        if self.parallel.tied is not None:
            self.parallel.tied.sync_grads()  # head copy on the last stage + embedding on the first
        return sum((_plain(loss.detach()) for loss in losses), torch.zeros((), device=self.device))

    def grad_sync(self, last: bool):
        """Data-parallel gradient reduction only after the last micro-batch of a step."""
        if self.parallel is None or self.micro_batch == self.local_batch:
            return contextlib.nullcontext()
        return self.parallel.grad_sync(self.model, last)

    def clip_gradients(self) -> torch.Tensor:
        """Scale all gradients so their global L2 norm is at most optim.grad_clip; returns the pre-clip norm.
        Distributed: the norm over every rank's gradients (DP, TP and PP), computed once and identical on all."""
        clip = self.cfg.optim.grad_clip or float("inf")
        if self.parallel is None:
            return torch.nn.utils.clip_grad_norm_(self.params, clip)
        return clip_grad_norm_(self.params, clip, self.parallel.pp_group, self.parallel.tied_copies())

    def global_loss(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """This rank's partial loss summed over data-parallel ranks and pipeline stages (a collective)."""
        return self.parallel.sum_over_dp_pp(loss_sum) if self.parallel is not None else loss_sum

    # ---- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over fixed batches. Distributed runs evaluate every batch on all data-parallel
        ranks (replicated: simple, and cheap next to training); pipelines pass each batch stage by stage."""
        parts = self.parallel.parts if self.parallel is not None else [self.model]
        for part in parts:
            part.eval()
        total = 0.0
        for x, y in self.val_batches:
            x, y = x.to(self.device), y.to(self.device)
            if self.pipeline is not None:
                total += self.pipeline_eval(x, y)
                continue
            with self.loss_context():
                with self.precision.autocast(self.device):
                    logits = self.model(x)
                if self.parallel is not None and self.parallel.tp_mesh is not None:
                    logits = DTensor.from_local(logits, self.parallel.tp_mesh, [Shard(-1)], run_check=False)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            total += _plain(loss).item()
        for part in parts:
            part.train()
        if self.parallel is not None:
            self.parallel.reshard()
        return total / len(self.val_batches)

    def pipeline_eval(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Mean loss of one batch through the pipeline, forward only; the last stage shares it with the others."""
        m, p = self.cfg.model, self.cfg.parallel
        seq = x.shape[1] // p.tp if p.sequence_parallel and p.tp > 1 else x.shape[1]
        with self.precision.autocast(self.device):
            logits = self.parallel.pipeline_forward(x, (x.shape[0], seq, m.d_model))
        loss = torch.zeros((), device=self.device)
        if logits is not None:
            with self.loss_context():
                if self.parallel.tp_mesh is not None:
                    logits = DTensor.from_local(logits, self.parallel.tp_mesh, [Shard(-1)], run_check=False)
                loss = _plain(F.cross_entropy(logits.float().flatten(0, 1), y.flatten()))
        dist.all_reduce(loss, group=self.parallel.pp_group)  # the same batch on every data-parallel rank
        return loss.item()

    def sample_text(self, n_tokens: int) -> str | None:
        """A sample from a fixed prompt with its own generator, so sampling never shifts the training RNG.
        Distributed runs sample in lockstep on every rank; not with TP or PP (the logits are split)."""
        if self.parallel is not None and (self.parallel.dims.tp > 1 or self.parallel.dims.pp > 1):
            return None
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + self.step)
        prompt = torch.tensor([self.tokenizer.encode("\n")], device=self.device)
        model = unwrap(self.model) if self.parallel is not None and self.parallel.dims.ddp else self.model
        # Eager even when the blocks are compiled: a sample is a prefill and a few hundred one-token forwards with
        # the KV cache, shapes the training graphs do not cover; compiling them costs more than they take.
        with self.precision.autocast(self.device), torch.compiler.set_stance("force_eager"):
            out = sample(model, prompt, n_tokens, generator=gen, vocab_limit=self.tokenizer.vocab_size)
        if self.parallel is not None:
            self.parallel.reshard()
        return self.tokenizer.decode(out[0, 1:].tolist())

    def eval_and_log(self) -> float:
        start = now()
        val_loss = self.evaluate()
        self.last_val_loss = val_loss
        record: dict[str, Any] = {"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
                                  "val_bits_per_token": val_loss / LN2, "eval_s": now() - start}
        if self.cfg.train.sample_tokens:
            start = now()
            text = self.sample_text(self.cfg.train.sample_tokens)
            if text is not None:
                record["sample"] = text
                record["sample_s"] = now() - start
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
        fit_start = now()
        # With a time budget, the process that starts the run fixes its length after the probe steps and
        # re-plans at every log step from the mean step time so far (a shared machine's speed drifts); a
        # resumed run keeps the saved length.
        plans = bool(t.time_budget_min) and self.budget_steps is None
        ran, timed_s, timed_steps, eval_s, evals = 0, 0.0, 0, 0.0, 0
        while self.step < self.total_steps:
            step_start = now()
            # Distributed: count the bytes handed to collectives during each logged step (a dispatch mode that
            # slows that one step, so it is left out of the throughput below).
            counting = self.parallel is not None and ((self.step + 1) % t.log_every == 0 or self.step + 1 == self.total_steps)
            step_before = self.step
            with CommCounter() if counting else contextlib.nullcontext() as comm:
                loss, grad_norm, lr = self.train_step()
            if self.step == step_before:  # skipped: a non-finite loss or gradient norm (train_step logged it)
                continue
            counted_s = now() - step_start if counting else 0.0
            ran += 1
            if ran > 2:  # this process's first two steps compile and warm up
                timed_s, timed_steps = timed_s + now() - step_start, timed_steps + 1
            if plans and timed_steps >= budget.PROBE_STEPS - 2 and (
                    self.budget_steps is None or self.step % t.log_every == 0):
                self.fix_length(now() - fit_start, timed_s / timed_steps, eval_s / evals if evals else None)
            interval_steps += 1
            if self.step % t.log_every == 0 or self.step == self.total_steps:
                loss_value = self.global_loss(loss).item()  # .item() syncs with the device: only on log steps
                elapsed, steps_timed = now() - interval_start, interval_steps
                if counting and interval_steps > 1:
                    elapsed, steps_timed = elapsed - counted_s, interval_steps - 1
                tokens_per_s = steps_timed * self.tokens_per_step / elapsed
                self.step_times.append(elapsed / steps_timed)
                self.logger.log({
                    "step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm.item(),
                    "tokens_per_s": tokens_per_s, "step_time_s": elapsed / steps_timed,
                    "predicted_step_time_s": self.prediction.get("step_time_s"),
                    "mfu": self.flops_per_token * tokens_per_s / self.peak_flops if self.peak_flops else None,
                    "mem_gib": memory_gib(self.device), "predicted_mem_gib": self.prediction.get("peak_mem_gib"),
                    **({"comm_bytes": comm.bytes} if counting else {}),
                })
                self.logger.advance(self.step, f"loss {loss_value:.4f}  {tokens_per_s:,.0f} tok/s")
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"loss is {loss_value} at step {self.step}; lower optim.lr or "
                                             f"raise optim.warmup_steps")
                interval_start, interval_steps = now(), 0
            else:
                self.logger.advance(self.step, f"{now() - step_start:.2f} s/step")
            pause = now()
            if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                self.eval_and_log()
                eval_s, evals = eval_s + now() - pause, evals + 1
            if ck.every and self.step % ck.every == 0 and self.step < self.total_steps:
                self.save()
            interval_start += now() - pause  # evaluation and checkpoints do not count as training time
        val_loss = self.eval_and_log()
        self.save()
        end = {"event": "end", "step": self.step, "val_loss": val_loss, "params_sha256": self.params_sha256(),
               "train_wall_s": now() - fit_start, **self.drift()}
        self.logger.log(end)
        return end

    def fix_length(self, elapsed_s: float, step_s: float, eval_s: float | None) -> None:
        """Set how many steps fit in train.time_budget_min (train/budget.py), given the seconds spent, the mean
        step time and the measured (else estimated) evaluation time. Distributed ranks take rank 0's count, so
        they all stop together."""
        t = self.cfg.train
        if eval_s is None:
            eval_tokens = t.eval_batches * eval_rows(t.global_batch) * t.seq_len
            eval_s = budget.eval_seconds(step_s, self.tokens_per_step, eval_tokens, t.sample_tokens, t.seq_len)
        total = budget.steps_within(60 * t.time_budget_min, elapsed_s, self.step, step_s, eval_s, t.eval_every,
                                    t.steps)
        total = rank0_choice(total)
        if total == self.budget_steps:
            return
        first = self.budget_steps is None
        self.budget_steps = total
        self.logger.set_total(total)
        self.logger.log({"event": "time_budget", "step": self.step, "budget_min": t.time_budget_min,
                         "measured_step_s": step_s, "eval_s": eval_s, "steps": total})
        if first:
            self.logger.print(f"time budget {t.time_budget_min:g} min: {total} steps fit ({step_s:.2f} s/step "
                              f"measured{'' if total < t.steps else '; train.steps is the limit'})")

    def drift(self) -> dict[str, float | None]:
        """Predicted vs measured step time. Measured = mean step_time_s of the logged intervals after the first
        (which includes warm-up); None with fewer than two intervals or without a prediction."""
        predicted = self.prediction.get("step_time_s")
        timed = self.step_times[1:]
        measured = sum(timed) / len(timed) if timed else None
        drift = 100 * (predicted - measured) / measured if predicted is not None and measured else None
        return {"predicted_step_time_s": predicted, "measured_step_time_s": measured, "step_time_drift_pct": drift}

    def save(self) -> None:
        ck = self.cfg.checkpoint
        if self.parallel is None:
            save_checkpoint(self.run_dir, self.step, self.model, self.optimizers, self.state_dict(), ck.keep)
        else:
            save_distributed_checkpoint(self.run_dir, self.step, self.parallel.parts, self.optimizers,
                                        self.state_dict(), ck.keep, self.cfg.model)

    def params_sha256(self) -> str | None:
        """Hash of the full model (rank 0; None on other ranks), the same for the same weights on every layout. A
        distributed run streams it one parameter at a time (parallel/fingerprint.py): no rank holds the model."""
        if self.parallel is None:
            return state_sha256(unique_state(self.model))
        par = self.parallel
        return sharded_sha256(par.parts, self.cfg.model.tie_embeddings, par.pp_group,
                              sender=par.coords["dp"] == 0 and par.coords["tp"] == 0)
