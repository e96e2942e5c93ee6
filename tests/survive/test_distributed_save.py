"""A distributed checkpoint save that fails on one rank (a full disk) ends on every rank with the same one-line
error at once — no rank waits at a barrier for the one that failed — and the previous checkpoint survives."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scalelm.train import durable
from scalelm.train.checkpoint import checkpoint_dirs

pytestmark = [pytest.mark.multiproc]

SCRIPT = textwrap.dedent('''
    import errno, os, sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from scalelm.model import GPT, get_preset
    from scalelm.train import checkpoint as ck

    dist.init_process_group("gloo")
    rank, run = dist.get_rank(), Path(sys.argv[1])
    torch.manual_seed(0)
    model = GPT(get_preset("tiny"))
    opt = torch.optim.AdamW(model.parameters())
    ck.save_distributed_checkpoint(run, 2, [model], [opt], {}, keep=3, model_cfg=model.cfg)
    if rank == int(sys.argv[2]):
        real_save = torch.save

        def full_disk(obj, f, *args, **kwargs):
            if str(f).endswith(".pt"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(obj, f, *args, **kwargs)

        torch.save = full_disk
    try:
        ck.save_distributed_checkpoint(run, 4, [model], [opt], {}, keep=3, model_cfg=model.cfg)
    except ck.CheckpointError as e:
        print(f"rank {rank}: {e}", flush=True)
    dist.destroy_process_group()
''')


def test_a_full_disk_on_one_rank_stops_every_rank_and_keeps_the_previous_checkpoint(tmp_path):
    failing_rank = 1  # not the rank that seals the checkpoint: the case where the others used to wait
    script = tmp_path / "save.py"
    script.write_text(SCRIPT)
    run = tmp_path / "run"
    src = str(Path(__file__).resolve().parents[2] / "src")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         str(run), str(failing_rank)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": src})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    previous = run / "checkpoints" / "step_00000002"
    kept = f"the previous checkpoint {previous} is intact; free space and run the same command to resume"
    where = f"could not write the checkpoint of step 4 in {run / 'checkpoints'}"
    other = 1 - failing_rank
    assert lines == sorted([f"rank {failing_rank}: {where} (No space left on device); {kept}",
                            f"rank {other}: {where} (another rank failed to write its part); {kept}"])
    assert checkpoint_dirs(run) == [previous] and durable.check(previous) is None
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"]  # no temporary left
