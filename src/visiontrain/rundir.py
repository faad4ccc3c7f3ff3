"""Where a run lives and the names of every file in a run directory.

Every module that reads or writes a run file takes its name from here.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from visiontrain.config import Config
from visiontrain.errors import UserError

# Every file of a run directory (docs/cli.md lists what each holds).
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
ENV_FILE = "env.json"
REPORT_FILE = "report.html"
PLOTS_DIR = "plots"
TB_DIR = "tb"
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
# train.strategy=fsdp writes each checkpoint as a folder of shards (engine/sharded.py):
# DCP's files plus SHARDED_STATE, the non-tensor state with the manifest of the shards.
SHARDED_SUFFIX = ".dcp"
LAST_SHARDED = "last.dcp"
BEST_SHARDED = "best.dcp"
SHARDED_STATE = "state.pt"
# A commit renames the previous folder to NAME.old, then NAME.partial to NAME.
SHARDED_ASIDE = ".old"
EXPORT_DIR = "export"
LR_FIND_JSON = "lr_find.json"
LR_FIND_PNG = "lr_find.png"
# The best trial of `visiontrain tune`, in its study folder.
TUNE_BEST = "best.json"


@dataclass
class RunPlan:
    """Where a run lives and what it resumes from."""

    run_dir: Path
    resume_from: Path | None


def plan_run(cfg: Config) -> RunPlan:
    """Resolve ``run.dir``/``run.name``/``run.resume`` into a folder and a checkpoint."""
    name = cfg.run.name or f"{cfg.task}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg.run.dir).expanduser() / name
    resume = cfg.run.resume
    if resume is None:
        if cfg.run.name is None:
            base, n = run_dir, 1
            while run_dir.exists():
                run_dir, n = base.with_name(f"{base.name}-{n}"), n + 1
        elif (run_dir / METRICS_FILE).exists() or (run_dir / CHECKPOINTS_DIR).exists():
            raise UserError(
                f"run directory {run_dir} already holds a run. Continue it with "
                "run.resume=auto, or choose another run.name."
            )
        return RunPlan(run_dir, None)
    if resume == "auto":
        return RunPlan(run_dir, last_checkpoint(run_dir, cfg.train.strategy))
    path = Path(resume).expanduser()
    if path.is_dir() and not is_sharded(path):
        path = last_checkpoint(path, cfg.train.strategy) or path / CHECKPOINTS_DIR / LAST_CHECKPOINT
    if not (path.is_file() or is_sharded(path)):
        raise UserError(
            f"run.resume={resume}: no checkpoint at {path}. Pass a .pt file, a .dcp folder "
            "(train.strategy=fsdp), a run directory, or run.resume=auto."
        )
    if path.parent.name == CHECKPOINTS_DIR:
        run_dir = path.parent.parent
    return RunPlan(run_dir, path)


def is_sharded(path: Path) -> bool:
    """Whether ``path`` is a committed sharded checkpoint folder (``NAME.dcp/``).

    A commit interrupted between its two renames (killed there) left no ``NAME.dcp`` but
    the complete previous one as ``NAME.dcp.old``: it is renamed back here, so the
    previous checkpoint is the one found.
    """
    aside = path.with_name(path.name + SHARDED_ASIDE)
    if path.suffix == SHARDED_SUFFIX and not path.exists() and (aside / SHARDED_STATE).is_file():
        with contextlib.suppress(OSError):  # another process may have renamed it first
            aside.rename(path)
    return path.is_dir() and (path / SHARDED_STATE).is_file()


def last_checkpoint(run_dir: Path, strategy: str) -> Path | None:
    """The run's ``checkpoints/last.pt`` or ``last.dcp/`` (first under fsdp), if any.

    The other strategy's file is found too: resuming it with the wrong ``train.strategy``
    is then refused by the config check, instead of starting the run over.
    """
    folder = run_dir / CHECKPOINTS_DIR
    file, sharded = folder / LAST_CHECKPOINT, folder / LAST_SHARDED
    for path in (sharded, file) if strategy == "fsdp" else (file, sharded):
        if path.is_file() or is_sharded(path):
            return path
    return None


def tool_dir(cfg: Config, prefix: str) -> Path:
    """Output folder of a tool verb: ``run.dir/run.name``, else a new timestamped one.

    The default name is ``<prefix>-<data>-<timestamp>``, made unique with a counter.
    """
    if cfg.run.name:
        return Path(cfg.run.dir).expanduser() / cfg.run.name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.run.dir).expanduser() / f"{prefix}-{cfg.data.name}-{stamp}"
    folder, n = base, 1
    while folder.exists():
        folder, n = base.with_name(f"{base.name}-{n}"), n + 1
    return folder


def disk_use(folder: Path) -> int:
    """Bytes the files under ``folder`` take, a hard-linked file counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in folder.rglob("*"):
        try:
            st = path.lstat()
        except OSError:
            continue
        if path.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total
