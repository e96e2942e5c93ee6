"""Parallelism applied to a plain model from the outside (torchtitan-style): see docs/parallel.md."""

from scalelm.parallel.dims import ParallelDims
from scalelm.parallel.parallelize import Parallel, init_distributed, parallelize, rank0_choice, release_process_groups

__all__ = ["Parallel", "ParallelDims", "init_distributed", "parallelize", "rank0_choice", "release_process_groups"]
