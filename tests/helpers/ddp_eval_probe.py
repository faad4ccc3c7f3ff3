"""Run under torchrun: evaluate a checkpoint's val split with the DDP trainer, per rank.

Usage: torchrun --nproc_per_node=N tests/helpers/ddp_eval_probe.py CKPT OUT_DIR [key=value...]
Writes OUT_DIR/rank<r>.json with the metrics every rank computed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console

from visiontrain.api import assemble
from visiontrain.config import build_config
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.engine.distributed import distributed_session


def main() -> None:
    ckpt, out_dir, *overrides = sys.argv[1:]
    state = load_checkpoint(ckpt)
    out = Path(out_dir)
    cfg = build_config(
        state["config"],
        [f"run.dir={out}", "run.name=probe", "train.progress=none", *overrides],
    )
    with distributed_session(cfg.train.device) as dist:
        trainer = assemble(cfg, Console(quiet=True))
        assert trainer is not None
        trainer.model.load_state_dict(state["model"])
        trainer.task.load_state_dict(state.get("task_state") or {})
        metrics = trainer.evaluate(trainer.loaders.val, "val", emit=False)
        for cb in trainer.callbacks:
            cb.close()
        (out / f"rank{dist.rank}.json").write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
