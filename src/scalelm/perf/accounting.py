"""How frameworks themselves account memory: Megatron-LM's theoretical footprint and DeepSpeed's ZeRO model states.

Megatron-LM prints a "theoretical memory footprint" at start-up (megatron/training/theoretical_memory_usage.py); it
is the reference its users compare a run with, so the planner reproduces its arithmetic here, written anew:

* weights and optimizer: parameters on the most loaded shard (its transformer layers, 1/pp of them, plus the
  embedding, all over tp; an untied output layer too when pp = 1) times 18 bytes (bf16 weight 2, fp32 gradient
  4, fp32 master weight 4, Adam moments 8), or 6 + 12/dp with the distributed optimizer;
* activations (sequence parallel + selective recompute only, as Megatron states): s·b·h·(18 + 4·ffn/h) per layer
  (Korthikanti et al. 2022, Table 2, generalized to the MLP width) for all L layers of the first stage's in-flight
  micro-batches, plus the embedding input (8 bytes per token) and its dropout mask (s·b·h) per in-flight
  micro-batch, times the interleaved schedule's 1 + (p-1)/(p·v), or min(1, m/p) without interleaving; without a
  pipeline also the output layer's input and the logits in fp32 (4·s·b·h·(1 + V/h)); all over tp.

DeepSpeed's ZeRO (Rajbhandari et al. 2020, sec. 5, Fig. 1) with K bytes of optimizer state per parameter and N_d
data-parallel ranks: stage 0 (2 + 2 + K)Ψ, stage 1 2Ψ + 2Ψ + KΨ/N_d, stage 2 2Ψ + (2 + K)Ψ/N_d, stage 3
(2 + 2 + K)Ψ/N_d.
"""

from __future__ import annotations

from dataclasses import dataclass

from scalelm.model.config import ModelConfig
from scalelm.perf.memory import zero_model_state_bytes

MB = 2.0**20


@dataclass(frozen=True)
class MegatronMemory:
    """Megatron's theoretical footprint of the most loaded rank, bytes (activations None where it gives none)."""

    weight_and_optimizer: float
    activations: float | None
    shard_params: float
    total_params: float

    @property
    def total(self) -> float | None:
        return None if self.activations is None else self.weight_and_optimizer + self.activations


def megatron_layer_params(cfg: ModelConfig) -> float:
    """One transformer layer as Megatron counts it: q, k, v and output projections, the MLP (three matrices when
    gated), two norms with weight and bias; no linear biases."""
    h, q = cfg.d_model, cfg.n_head * cfg.dim_head
    attention = 2 * h * q * (1 + cfg.kv_heads / cfg.n_head)
    mlp = h * cfg.ffn_hidden * (3 if cfg.mlp == "swiglu" else 2)
    return attention + mlp + 4 * h


def megatron_memory(cfg: ModelConfig, tp: int = 1, pp: int = 1, dp: int = 1, distributed_optimizer: bool = False,
                    seq_len: int | None = None, micro_batch: int = 1, vpp: int | None = None,
                    microbatches: int | None = None, sequence_parallel: bool = True,
                    recompute: str = "selective") -> MegatronMemory:
    """Megatron-LM's theoretical memory of the most loaded rank for a model and a layout (module docstring).

    `cfg.vocab_size` is the padded vocabulary Megatron uses; `vpp` None is the non-interleaved schedule."""
    h, L, v = cfg.d_model, cfg.n_layer, cfg.vocab_size
    layers = L * megatron_layer_params(cfg) + 2 * h  # the final norm's weight and bias
    embedding = h * v
    untied = not cfg.tie_embeddings
    total = layers + embedding * (2 if untied else 1)
    shard = (layers / pp + embedding) / tp
    if untied and pp == 1:
        shard += embedding / tp
    per_param = 6 + 12 / dp if distributed_optimizer else 18
    weights = shard * per_param
    if not sequence_parallel or recompute != "selective":
        return MegatronMemory(weights, None, shard, total)
    s, b = seq_len or cfg.max_seq_len, micro_batch
    act = s * b * h * (18 + 4 * cfg.ffn_hidden / h) * L
    act += 8 * s * b * pp + s * b * h * pp
    if vpp is not None:
        act *= 1 + (pp - 1) / (pp * vpp)
    elif pp > 1 and microbatches is not None:
        act *= min(1.0, microbatches / pp)
    if pp == 1:
        act += s * b * h * 4 * (1 + v / h)
    return MegatronMemory(weights, act / tp, shard, total)


def zero_states(psi: float, stage: int, n_d: int, k: float = 12.0) -> dict[str, float]:
    """DeepSpeed ZeRO model-state bytes per rank (fp16/bf16 weights and gradients, K bytes of optimizer states)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage {stage}; use 0, 1, 2 or 3")
    states = zero_model_state_bytes(psi, stage, n_d, k=k, grad_bytes=2)  # the planner's own formula
    return {**states, "total": sum(states.values())}
