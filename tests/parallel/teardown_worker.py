"""Train under torchrun with the trainer owning its process group, then check that no gloo thread is left.

    torchrun --nproc-per-node 2 tests/parallel/teardown_worker.py OUT_DIR FLAGS...

One whole `scalelm train` (process group created and released by the trainer; a second one in the same launch
could not rendezvous again). A gloo thread still running afterwards would meet interpreter shutdown, where a rank
can abort after a finished run.
"""

import os
import sys

from scalelm.cli import main as scalelm


def gloo_threads() -> list[str]:
    tasks = "/proc/self/task"
    names = (open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks))
    return [name for name in names if "gloo" in name]


def main() -> None:
    out, flags = sys.argv[1], sys.argv[2:]
    code = scalelm(["train", *flags, "--out", out])
    if code != 0:
        raise SystemExit(f"training failed with exit code {code}")
    left = gloo_threads()
    if left:
        raise SystemExit(f"gloo threads still running after the run: {left}")


if __name__ == "__main__":
    main()
