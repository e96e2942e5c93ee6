"""Start a scalelm command on N processes of this machine: `scalelm train|generate --nproc N` re-executes itself
under torchrun, whose exit code becomes the command's."""

from __future__ import annotations

import os
import sys


def torchrun_command(nproc: int, command: str, args: list[str], max_restarts: int = 0) -> list[str]:
    """The torchrun line for `scalelm COMMAND --nproc N ARGS`: one machine (standalone rendezvous), N processes;
    with max_restarts, torchrun restarts the whole group that often after a process dies."""
    restarts = ["--max-restarts", str(max_restarts)] if max_restarts else []
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            *restarts, "-m", "scalelm", command, *args]


def exec_torchrun(nproc: int, command: str, args: list[str], max_restarts: int = 0) -> None:
    """Replace this process with torchrun running `scalelm COMMAND ARGS` on `nproc` processes."""
    line = torchrun_command(nproc, command, args, max_restarts)
    sys.stdout.flush()
    os.execv(line[0], line)


def pop_nproc(argv: list[str]) -> tuple[int | None, list[str]]:
    """`--nproc N` / `--nproc=N` out of a command's arguments: (N or None, the rest)."""
    return pop_count(argv, "--nproc", "a positive number of processes", minimum=1)


def pop_count(argv: list[str], flag: str, what: str, minimum: int = 0) -> tuple[int | None, list[str]]:
    """`FLAG N` / `FLAG=N` out of a command's arguments, N a whole number ≥ minimum: (N or None, the rest)."""
    from scalelm.usage import UsageError

    rest, count, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == flag or arg.startswith(flag + "="):
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            i += 1 if "=" in arg else 2
            if not value.isdigit() or int(value) < minimum:
                raise UsageError(f"{flag} needs {what}, got {value!r}")
            count = int(value)
            continue
        rest.append(arg)
        i += 1
    return count, rest


def is_launched() -> bool:
    """Whether this process is one rank of a torchrun launch (then it must not launch again)."""
    return "WORLD_SIZE" in os.environ
