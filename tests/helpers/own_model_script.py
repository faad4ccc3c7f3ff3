"""A user's script: its own nn.Module and Dataset (never registered) through vt.build_trainer.

Usage: python own_model_script.py RUN_DIR NAME [train|eval] [key=value ...]

``train`` fits (resuming with run.resume=auto when asked) and prints the result as JSON;
with ``VT_TEST_SIGTERM_AT=N`` a callback sends this process SIGTERM after update N, as a
scheduler preempting the job would. ``eval`` evaluates the run's best checkpoint in one
process and prints its val metrics as JSON. Works under torchrun too.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
from torch import nn

import visiontrain as vt


class Blobs(torch.utils.data.Dataset):
    """Bright or dark noisy squares; the class is the brightness."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, 2, (n,), generator=g).tolist()
        noise = torch.rand(n, 3, 16, 16, generator=g) * 120
        shift = torch.tensor(self.targets, dtype=torch.float32)[:, None, None, None] * 90
        self.images = (noise + shift).to(torch.uint8)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SigtermAt(vt.Callback):
    name = "sigterm_at"

    def __init__(self, step: int) -> None:
        self.step = step

    def on_update(self, trainer) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def data():
    return vt.data.from_datasets(
        Blobs(72, 0), Blobs(41, 1), Blobs(24, 2), classes=["dark", "bright"]
    )


def config(run_dir: str, name: str, extra: list[str]):
    return vt.resolve_config(
        {
            "train": {"epochs": 3, "progress": "none", "deterministic": True, "seed": 7},
            "data": {"batch_size": 8, "num_workers": 2, "augment": "light"},
            "run": {"dir": run_dir, "name": name, "report": False},
        },
        extra,
    )


def main() -> int:
    run_dir, name, mode, *extra = sys.argv[1:]
    cfg = config(run_dir, name, extra)
    if mode == "eval":
        from visiontrain.data.pipeline import build_loaders
        from visiontrain.engine.evaluate import evaluate
        from visiontrain.engine.precision import Precision
        from visiontrain.engine.restore import load_trained
        from visiontrain.tasks import build_task

        loaded = load_trained(os.path.join(run_dir, name), model=TinyNet())
        bundle = data().build(loaded.cfg.data, loaded.cfg.task)
        task = build_task(loaded.cfg, bundle, loaded.device)
        task.load_state_dict(loaded.task_state)
        loader = build_loaders(loaded.cfg, bundle, loaded.device).val
        metrics = evaluate(loaded.model, loader, task, loaded.prep, Precision("32", loaded.device))
        print(json.dumps(metrics))
        return 0
    stop = int(os.environ.get("VT_TEST_SIGTERM_AT", "0"))
    callbacks = [SigtermAt(stop)] if stop else []
    torch.manual_seed(0)  # the user's own init, the same in every process
    try:
        result = vt.build_trainer(cfg, model=TinyNet(), data=data(), callbacks=callbacks).fit()
    except vt.Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    if result.rank == 0:
        print(json.dumps({"run_dir": str(result.run_dir), "summary": result.summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
