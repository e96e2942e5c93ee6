"""Run several training layouts in one torchrun launch (process-group start-up is the slow part on CPU).

    torchrun --nproc-per-node N tests/parallel/worker.py OUT_ROOT 'JSON [[name, [--key, value, ...]], ...]' BASE...

Each layout is `scalelm train BASE... FLAGS... --out OUT_ROOT/name`, through the CLI's own entry point, as a
user's `torchrun -m scalelm train ...` would run it; rank 0 writes the metrics.
"""

import json
import os
import sys

import torch.distributed as dist

from scalelm.cli import main as scalelm
from scalelm.parallel import release_process_groups


def main() -> None:
    root, layouts, base = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
    dist.init_process_group("gloo")  # shared by all layouts; train() leaves a group it did not create alone
    for name, flags in layouts:
        code = scalelm(["train", *base, *flags, "--out", os.path.join(root, name)])
        if code != 0:
            raise SystemExit(f"layout {name} failed with exit code {code}")
        dist.barrier()
    release_process_groups()


if __name__ == "__main__":
    main()
