"""The run configuration's sections: one dataclass each, a docstring under every field (the CLI's help).

Torch-free, so the planner can read configs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from scalelm.model.config import ModelConfig
from scalelm.model.presets import get_preset


class ConfigError(ValueError):
    """A configuration mistake, phrased for the person who made it."""


@dataclass
class DataConfig:
    path: str | None = None
    """Prepared dataset directory (from `scalelm prepare`); None = the bundled Shakespeare, character level."""
    verify: bool = False
    """Check every shard's sha256 against meta.json before training (reads the whole dataset once); shard sizes
    are always checked."""


@dataclass
class OptimConfig:
    name: Literal["auto", "adamw", "muon"] = "auto"
    """muon = torch.optim.Muon on the blocks' matrices + AdamW on embeddings, head, norms and biases; adamw = AdamW
    on everything; auto = muon on every layout (sharded matrices are gathered one at a time to be orthogonalized),
    adamw for LoRA runs (their adapters are low-rank factors).
    Muon trains the default model to a lower loss in the same steps (docs/benchmarks.md#muon-vs-adamw)."""
    lr: float = 3e-3
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of lr (cosine, linear and the decay phase of wsd)."""
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """After linear warmup: cosine or linear decay to min_lr, warmup-stable-decay, or constant."""
    warmup_steps: int = 30
    """Linear warmup from 0 to lr over these optimizer steps."""
    decay_fraction: float = 0.2
    """wsd only: share of the run spent in the final linear decay."""
    weight_decay: float = 0.1
    """Decoupled weight decay, on matrices only (not on norms, biases or embeddings)."""
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 = no clipping (the norm is still logged)."""
    muon_lr: float = 0.03
    """Learning rate of the Muon group (name = muon)."""


@dataclass
class TrainConfig:
    steps: int = 450
    """Optimizer steps (the most a run takes when train.time_budget_min is set)."""
    seq_len: int = 0
    """Tokens per sequence (<= model.max_seq_len); 0 = model.max_seq_len."""
    global_batch: int = 16
    """Sequences per optimizer step, over all data-parallel ranks and micro-batches."""
    micro_batch: int = 0
    """Sequences per forward/backward on one rank; 0 = the whole local batch (no accumulation). The same with
    parallel.pp > 1: the pipeline splits the per-rank batch into per-rank batch / micro_batch micro-batches
    (parallel.pp_microbatches, if also set, must agree)."""
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision: auto = bf16 where the device runs it faster (CUDA with bf16; a CPU whose measured bf16
    matmul rate beats its fp32 one), else fp32. The run's config.toml records the dtype chosen."""
    time_budget_min: float = 0.0
    """Fit the run into this many minutes of training-loop wall time (evaluations and compilation included): after
    its first steps the run's length is fixed at the most steps that fit, at most `steps`, and kept on resume.
    0 = no budget: run `steps` steps."""
    compile: bool = False
    """torch.compile the blocks."""
    log_every: int = 10
    """Write a metrics line every N steps."""
    eval_every: int = 100
    """Evaluate on the validation split every N steps (and at the end); 0 = only at the end."""
    eval_batches: int = 10
    """Validation batches per evaluation (the final one too), each of 32 sequences, or of global_batch when that
    is smaller: an evaluation batch costs a third of a training step. The same windows every time, and for every
    training batch from 32 up, so val losses compare across runs."""
    sample_tokens: int = 200
    """Tokens generated after each evaluation; 0 = none."""
    threads: int = 0
    """torch intra-op threads on CPU; 0 = leave torch's default."""
    max_nonfinite_steps: int = 5
    """A step whose loss or gradient norm is not finite is skipped (parameters, optimizer state and schedule
    unchanged, the batch consumed) and logged, up to this many in a row; one more stops the run, its last
    checkpoint intact. 0 = stop at the first. (With fp16's loss scaler, the scaler skips such steps instead.)"""


@dataclass
class CpuConfig:
    """Speedups for plain fp32 training on a CPU, applied to the built model from outside
    (`scalelm.kernels.cpu.apply_cpu_kernels`); they never touch GPU, bf16 or tensor/FSDP-sharded runs."""

    kernels: bool = True
    """Apply scalelm's C++ CPU kernels (causal attention with RoPE inside over fused q/k/v, RMSNorm weight
    gradient, token-embedding backward); built on first use with the [cpu] extra, else PyTorch's operators."""
    matmul: Literal["auto", "onednn", "blas"] = "auto"
    """fp32 GEMM backend of the linear layers: oneDNN or PyTorch's BLAS; auto = the faster square matmul as
    measured on this CPU (cached with the MFU peak)."""
    keep_host_memory: bool = True
    """Keep freed memory in the process for the next step instead of returning it to the OS (glibc), which saves
    re-faulting every activation each step; false leaves the system allocator as it is. Single-process runs only:
    distributed CPU ranks hand every freed block of 1 MiB or more back instead, so a sharded rank's resident
    memory follows its live tensors (train/host_memory.py)."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every N steps (and at the end); 0 = only at the end."""
    keep: int = 2
    """How many step checkpoints to keep (the newest)."""
    resume: bool = True
    """Continue from the newest checkpoint in the run directory if there is one (the newest undamaged one: each
    checkpoint's manifest is checked first)."""
    verify: bool = True
    """Check every file's sha256 against the checkpoint's manifest before loading it; false = sizes only."""


@dataclass
class MetricsConfig:
    tensorboard: bool = False
    """Also write TensorBoard events (needs the [tb] extra)."""
    progress: bool = True
    """Show a live progress bar on the console."""


@dataclass
class ParallelConfig:
    """How ranks share the work (see docs/parallel.md). Used when the run has more than one process (torchrun);
    a single process uses only auto, hardware and activation_checkpoint. dp_replicate × dp_shard × tp × pp must
    equal the number of processes."""

    auto: bool = False
    """Ask the planner (scalelm.perf) for the fastest layout the trainer can run at this world size and use it:
    tp, pp, dp, zero, pipeline schedule and micro-batches, sequence parallel, activation checkpointing and
    train.micro_batch are chosen for you (`scalelm train --parallel auto`; needs a hardware model)."""
    hardware: str = ""
    """Hardware model for the predicted step time and memory logged by every run (and for auto): a built-in name
    (`scalelm hw list`), a TOML file, or `local`; "" = automatic: the built-in file matching the GPU's name on
    CUDA, the file `scalelm calibrate` wrote on CPU (no prediction without one)."""

    dp_replicate: int = 1
    """Data-parallel replicas (with zero >= 2: the replicate dimension of HSDP)."""
    dp_shard: int = -1
    """Data-parallel ranks that shard parameters (zero >= 2) or hold full replicas (zero 0/1); -1 = the ranks left
    after dp_replicate, tp and pp."""
    tp: int = 1
    """Tensor-parallel degree (Megatron layout); must divide heads, kv heads, the MLP width and the vocabulary."""
    pp: int = 1
    """Pipeline-parallel degree: the blocks are split into pp × pp_stages_per_rank stages."""
    zero: int = 3
    """0 = DDP all-reduce, 1 = + sharded optimizer states (ZeroRedundancyOptimizer), 2 = FSDP2 without resharding
    after forward (sharded optimizer states and gradients), 3 = FSDP2 (parameters sharded too)."""
    pp_schedule: Literal["gpipe", "1f1b", "interleaved-1f1b", "interleaved-zb", "zbv"] = "1f1b"
    """Pipeline schedule from torch.distributed.pipelining."""
    pp_microbatches: int = 0
    """Pipeline micro-batches per optimizer step; 0 = from train.micro_batch (per-rank batch / micro_batch) when
    that is set, else pp. Must divide the per-rank batch; 1f1b needs at least pp, the interleaved schedules and
    zbv a multiple of pp."""
    pp_stages_per_rank: int = 0
    """Model chunks per pipeline rank; 0 = 1 for gpipe/1f1b, 2 for interleaved-1f1b, interleaved-zb and zbv."""
    sequence_parallel: bool = False
    """With tp > 1: shard the norms' activations along the sequence (needs model.pos = rope)."""
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    """Recompute blocks in backward: full = every block, selective = every ac_every-th block."""
    ac_every: int = 2
    """selective activation checkpointing: checkpoint blocks 0, k, 2k, ..."""
    cpu_offload: bool = False
    """zero >= 2 on CUDA: keep sharded parameters, gradients and optimizer states in CPU memory (FSDP2 offload)."""
    fsdp_param_dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """zero >= 2: dtype FSDP2 all-gathers parameters in and the blocks compute with (MixedPrecisionPolicy); the
    sharded fp32 weights stay the optimizer's. auto = bf16 when train.dtype is bf16, else fp32."""
    fsdp_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """zero >= 2: dtype FSDP2 reduces (reduce-scatter / all-reduce) gradients in."""
    timeout_s: float = 600.0
    """Seconds a collective may wait for the other ranks before the run stops with an error naming the rank that
    stopped answering (a crashed or hung peer, or ranks that disagree on the layout)."""
    grad_compression: Literal["none", "bf16", "powersgd"] = "none"
    """zero = 0 only: DDP communication hook that compresses gradients before the all-reduce."""
    powersgd_rank: int = 4
    """PowerSGD: rank of the low-rank gradient approximation."""
    powersgd_start_step: int = 10
    """PowerSGD: plain all-reduce for the first steps (error-feedback warm-up)."""


@dataclass
class LoraConfig:
    """Low-rank adapters on the blocks' linear layers (needs init_from); the base weights stay frozen and the run's
    checkpoints hold the adapters alone (`scalelm merge` folds them into a plain model)."""

    rank: int = 0
    """Rank of each adapter; 0 = no LoRA (the whole model trains)."""
    alpha: float = 16.0
    """Scale numerator: an adapter adds (alpha / rank) · B A to its weight."""
    targets: str = "q,v"
    """Layers to adapt: a comma list of q, k, v, o (attention) and w1, w2, w3 (MLP), or all-linear."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=lambda: get_preset("shakespeare-char"))
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cpu: CpuConfig = field(default_factory=CpuConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    seed: int = 1337
    """Seeds weights, data order and dropout."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = cuda when available, else cpu."""
    out: str = "runs/latest"
    """Run directory: checkpoints, metrics.jsonl, config.toml."""
    init_from: str = ""
    """Start from these weights (`--init-from`): a run directory, a checkpoint, or a Hugging Face GPT-2/Llama
    directory; optimizer, schedule and data order start fresh. "" = the seed's random weights."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = ("model", "data", "optim", "train", "checkpoint", "metrics", "parallel", "cpu", "lora")
TOP_LEVEL = ("seed", "device", "out", "init_from")
