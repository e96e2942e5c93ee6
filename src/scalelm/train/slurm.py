"""`scalelm slurm`'s sbatch script: srun starts one torchrun per node, torchrun the training processes."""

from __future__ import annotations

import shlex

SBATCH_TEMPLATE = """#!/bin/bash
# Written by `scalelm slurm`; submit with: sbatch {script}
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
{gpu_line}#SBATCH --cpus-per-task={cpus}
#SBATCH --time={time}
#SBATCH --output=%x-%j.out
{extra}
set -euo pipefail
# One torchrun per node (srun starts them); torchrun starts {nproc} training processes per node and they meet
# through the c10d rendezvous on the first node of the allocation.
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{threads}}}
srun --kill-on-bad-exit=1 python -m torch.distributed.run \\
    --nnodes "$SLURM_NNODES" --nproc-per-node {nproc} \\
    --rdzv-id "$SLURM_JOB_ID" --rdzv-backend c10d --rdzv-endpoint "$head_node:{port}" \\
    -m scalelm train {train_args}
"""


def slurm_script(nodes: int, nproc_per_node: int, gpus_per_node: int, train_args: list[str], job_name: str = "scalelm",
                 time: str = "01:00:00", partition: str | None = None, account: str | None = None,
                 cpus_per_task: int | None = None, port: int = 29500, script: str = "train.sbatch") -> str:
    """An sbatch script: srun starts one torchrun per node, torchrun the training processes (pure function)."""
    extra = "".join(f"#SBATCH --{k}={v}\n" for k, v in (("partition", partition), ("account", account)) if v)
    cpus = cpus_per_task or max(1, 8 * nproc_per_node)
    return SBATCH_TEMPLATE.format(
        script=script, job_name=job_name, nodes=nodes, time=time, cpus=cpus, nproc=nproc_per_node, port=port,
        gpu_line=f"#SBATCH --gpus-per-node={gpus_per_node}\n" if gpus_per_node else "", extra=extra.rstrip("\n"),
        threads=max(1, cpus // nproc_per_node), train_args=" ".join(shlex.quote(a) for a in train_args))
