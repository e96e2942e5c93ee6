"""ParallelDims: the resolved parallel degrees of a run and its one named DeviceMesh.

The mesh is ("pp", "dp_replicate", "dp_shard", "tp") with TP innermost, so tensor-parallel ranks are neighbours
(on GPUs: the same node, the fastest links). Every dimension is present, size 1 included, so code can always ask
for mesh["tp"]; flattened views name the groups the trainer uses: "dp" (all data-parallel ranks: the loader's
slice and the loss sum), and "dp_fsdp" (replicate × shard, what FSDP2/HSDP is given).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from scalelm.config import Config, validate_parallel

log = logging.getLogger("scalelm.parallel")

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    zero: int
    stages_per_rank: int
    microbatches: int
    world_size: int
    flat: dict = field(default_factory=dict, compare=False)
    """Flattened meshes built by build_mesh: "dp" and "pp_dp"."""

    @classmethod
    def from_config(cls, cfg: Config, world_size: int) -> ParallelDims:
        """Resolve dp_shard = -1 and validate everything against the world size and the model (ConfigError)."""
        d = validate_parallel(cfg, world_size)
        return cls(d["dp_replicate"], d["dp_shard"], d["tp"], d["pp"], cfg.parallel.zero, d["stages_per_rank"],
                   d["microbatches"], world_size)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> bool:
        """Parameters/gradients sharded by FSDP2 (zero 2 or 3) over more than one data-parallel rank."""
        return self.dp > 1 and self.zero >= 2

    @property
    def ddp(self) -> bool:
        return self.dp > 1 and self.zero <= 1

    def describe(self) -> str:
        parts = [f"{name}={getattr(self, name)}" for name in ("dp_replicate", "dp_shard", "tp", "pp")]
        return f"world {self.world_size}: " + " × ".join(parts) + f", zero {self.zero}"

    def build_mesh(self, device_type: str) -> DeviceMesh:
        mesh = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp),
                                mesh_dim_names=MESH_DIMS)
        self.flat["dp"] = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        self.flat["pp_dp"] = mesh["pp", "dp_replicate", "dp_shard"]._flatten("pp_dp")  # partial losses summed here
        log.info("device mesh %s %s", dict(zip(MESH_DIMS, mesh.mesh.shape)), self.describe())
        return mesh


def coordinates(mesh: DeviceMesh, dp_mesh: DeviceMesh) -> dict[str, int]:
    """This rank's coordinate along every named dimension (and the flattened dp)."""
    coords = {name: mesh.get_local_rank(name) for name in MESH_DIMS}
    coords["dp"] = dp_mesh.get_local_rank()
    return coords


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
