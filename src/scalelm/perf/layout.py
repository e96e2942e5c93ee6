"""A parallel layout and the checks that make it valid for a model, a batch and a device count."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from scalelm.model.config import ModelConfig
from scalelm.perf.pipeline import SCHEDULES

RECOMPUTE = ("none", "selective", "full")
OPTIMIZERS = ("adamw", "muon")
PRECISIONS = ("bf16", "fp16", "fp8", "fp32")


class LayoutError(ValueError):
    """A layout that cannot run; the message says which number to change and to what."""


@dataclass(frozen=True)
class Layout:
    """How one training step is spread over devices: dp·cp·tp·pp = world size (TP innermost)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    """Data-parallel degree (replicas x shards)."""
    cp: int = 1
    """Context (sequence) parallel degree for long sequences (ring attention)."""
    dp_shard: int | None = None
    """ZeRO/FSDP sharding group; None = all of dp (FSDP); smaller = HSDP (shard inside, replicate across)."""
    zero: int = 0
    micro_batch: int = 1
    vpp: int = 1
    """Virtual pipeline stages (model chunks) per pipeline rank; >1 means the interleaved schedule."""
    schedule: str = "1f1b"
    sequence_parallel: bool = False
    recompute: str = "none"
    flash_attention: bool = True
    precision: str = "bf16"
    offload: bool = False
    """ZeRO-Offload: optimizer states and step on the host (Ren et al. 2021)."""
    optimizer: str = "adamw"
    """adamw, or muon (Newton-Schulz orthogonalized momentum on the block matrices, AdamW on the rest)."""

    @property
    def world(self) -> int:
        return self.dp * self.cp * self.tp * self.pp

    @property
    def shard(self) -> int:
        """Ranks that share one copy of the sharded model states (ZeRO over dp x cp, as FSDP2 does)."""
        base = self.dp_shard if self.dp_shard is not None else self.dp
        return base * self.cp

    def short(self) -> str:
        parts = [f"tp{self.tp}", f"pp{self.pp}" + (f"v{self.vpp}" if self.vpp > 1 else ""), f"dp{self.dp}"]
        if self.cp > 1:
            parts.append(f"cp{self.cp}")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def check_layout(cfg: ModelConfig, layout: Layout, n_devices: int, global_batch: int, seq_len: int) -> None:
    """Raise LayoutError naming the first thing that makes `layout` impossible."""
    lo = layout
    if cfg.n_head % lo.tp:
        ok = [t for t in range(1, cfg.n_head + 1) if cfg.n_head % t == 0 and t <= 64]
        raise LayoutError(f"tp={lo.tp} does not divide n_head={cfg.n_head}; use one of {ok}")
    if cfg.kv_heads % lo.tp and lo.tp % cfg.kv_heads:
        raise LayoutError(f"tp={lo.tp} and n_kv_head={cfg.kv_heads} must divide one another")
    if lo.world != n_devices:
        raise LayoutError(f"dp*cp*tp*pp = {lo.dp}*{lo.cp}*{lo.tp}*{lo.pp} = {lo.world} but there are "
                          f"{n_devices} devices; make the product equal the device count")
    if lo.pp * lo.vpp > cfg.n_layer:
        raise LayoutError(f"pp*vpp={lo.pp * lo.vpp} exceeds n_layer={cfg.n_layer}; lower pp or vpp")
    if lo.vpp > 1 and cfg.n_layer % (lo.pp * lo.vpp):
        raise LayoutError(f"interleaving needs pp*vpp={lo.pp * lo.vpp} to divide n_layer={cfg.n_layer}")
    if global_batch % (lo.dp * lo.micro_batch):
        raise LayoutError(f"global batch {global_batch} is not a multiple of dp*micro_batch = "
                          f"{lo.dp}*{lo.micro_batch}; change --global-batch or the micro-batch")
    if seq_len % lo.cp:
        raise LayoutError(f"cp={lo.cp} does not divide the sequence length {seq_len}")
    if lo.zero not in (0, 1, 2, 3):
        raise LayoutError(f"zero={lo.zero}; use 0, 1, 2 or 3")
    if lo.recompute not in RECOMPUTE:
        raise LayoutError(f"recompute={lo.recompute!r}; use one of {', '.join(RECOMPUTE)}")
    if lo.schedule not in SCHEDULES:
        raise LayoutError(f"schedule={lo.schedule!r}; use one of {', '.join(SCHEDULES)}")
    if lo.precision not in PRECISIONS:
        raise LayoutError(f"precision={lo.precision!r}; use one of {', '.join(PRECISIONS)}")
    if lo.optimizer not in OPTIMIZERS:
        raise LayoutError(f"optimizer={lo.optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    if lo.optimizer == "muon" and (lo.tp > 1 or (lo.zero >= 2 and lo.dp * lo.cp > 1)):
        raise LayoutError("muon orthogonalizes whole matrices: it needs tp=1 and zero <= 1")
    if lo.sequence_parallel and lo.tp == 1:
        raise LayoutError("sequence parallelism needs tp > 1")
    if lo.dp_shard is not None and lo.dp % lo.dp_shard:
        raise LayoutError(f"dp_shard={lo.dp_shard} must divide dp={lo.dp}")
