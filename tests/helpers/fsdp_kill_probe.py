"""Run under torchrun: ``visiontrain train`` whose rank 0 is SIGKILLed inside a commit.

Usage: torchrun --nproc_per_node=N tests/helpers/fsdp_kill_probe.py STAGE NAME COUNT ARGS...
Rank 0 kills itself (SIGKILL: no handler, no cleanup) the COUNT-th time the sharded
checkpoint NAME (e.g. last.dcp) reaches STAGE of its commit (engine/sharded.py:
``written`` — every file in NAME.partial, nothing renamed; ``set_aside`` — the previous
NAME renamed to NAME.old, the new one not yet in place).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from visiontrain.cli import main
from visiontrain.engine import sharded


def main_killed() -> int:
    stage, name, count, *args = sys.argv[1:]
    seen = 0

    def hook(at: str, folder: Path) -> None:
        nonlocal seen
        if at == stage and folder.name == name:
            seen += 1
            if seen == int(count):
                os.kill(os.getpid(), signal.SIGKILL)

    sharded.fault_hook = hook
    return main(["train", *args])


if __name__ == "__main__":
    sys.exit(main_killed())
