"""compile, channels_last, activation checkpointing and EMA: same training as the plain run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from conftest import TINY
from visiontrain.engine import host_memory
from visiontrain.engine.checkpoint import eval_weights, load_checkpoint
from visiontrain.engine.ema import ModelEma
from visiontrain.engine.wrap import _segments, enable_activation_checkpointing
from visiontrain.errors import ConfigError

TWO_EPOCHS = [*TINY, "train.epochs=2", "train.log_every=1"]


def losses(run: Path) -> tuple[list[float], list[float]]:
    """Training losses per logged step and validation losses per epoch."""
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["kind"] == "train_step"]
    val = [r["loss"] for r in records if r["kind"] == "eval" and r["split"] == "val"]
    return train, val


def close(a: list[float], b: list[float], tol: float) -> bool:
    return len(a) == len(b) and all(
        math.isclose(x, y, rel_tol=tol, abs_tol=tol) for x, y in zip(a, b, strict=True)
    )


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    from visiontrain.cli import main

    root = tmp_path_factory.mktemp("plain")
    assert main(["train", *TWO_EPOCHS, f"run.dir={root}", "run.name=p"]) == 0
    return root / "p"


def test_channels_last_matches_the_plain_run(cli, tmp_path, plain):
    r = cli("train", *TWO_EPOCHS, f"run.dir={tmp_path}", "train.channels_last=true")
    assert r.code == 0, r.err
    train, val = losses(r.run_dir)
    p_train, p_val = losses(plain)
    assert close(train, p_train, 1e-4) and close(val, p_val, 1e-4)


def test_activation_checkpointing_matches_the_plain_run(cli, tmp_path, plain):
    r = cli("train", *TWO_EPOCHS, f"run.dir={tmp_path}", "train.activation_checkpointing=true",
            "train.progress=plain")  # fmt: skip
    assert r.code == 0, r.err
    assert "activation checkpointing: 1 stages" in r.out
    train, val = losses(r.run_dir)
    p_train, p_val = losses(plain)
    # Recomputation repeats the same ops; BatchNorm statistics are not updated twice, so
    # the validation loss (running statistics) matches too.
    assert close(train, p_train, 1e-5) and close(val, p_val, 1e-5)


def test_ema_trains_the_same_and_evaluates_the_average(cli, tmp_path, plain):
    r = cli("train", *TWO_EPOCHS, f"run.dir={tmp_path}", "train.ema=true",
            "train.ema_decay=0.9")  # fmt: skip
    assert r.code == 0, r.err
    train, val = losses(r.run_dir)
    p_train, p_val = losses(plain)
    assert train == p_train  # the average never feeds back into training
    assert val != p_val  # validation scores the averaged weights
    best = load_checkpoint(r.run_dir / "checkpoints" / "best.pt")
    assert best["ema"]["updates"] > 0
    assert any(
        not torch.equal(best["model"][k], best["ema"]["module"][k])
        for k in best["model"]
        if best["model"][k].is_floating_point()
    )
    # eval and predict load the averaged weights: the recorded validation is reproduced.
    e = cli("eval", r.run_dir, "--split", "val", "--format", "json")
    assert e.code == 0, e.err
    summary = json.loads((r.run_dir / "summary.json").read_text())
    assert math.isclose(json.loads(e.out)["loss"], summary["metrics"]["val"]["loss"], rel_tol=1e-5)
    assert eval_weights(best) is best["ema"]["module"]


def test_resuming_with_ema_from_a_run_without_it_is_refused(cli, tmp_path, plain):
    r = cli("train", *TWO_EPOCHS, "train.epochs=3", "train.ema=true",
            f"run.resume={plain / 'checkpoints' / 'last.pt'}")  # fmt: skip
    assert r.code == 2 and "train.ema: False in the checkpoint, True now" in r.err


def test_ema_update_warms_up_and_copies_buffers():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.99)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    before = ema.module[0].weight.clone()
    ema.update(model)
    # After one update the decay is min(0.99, 2/11): the average moves most of the way.
    d = 2 / 11
    assert torch.allclose(ema.module[0].weight, d * before + (1 - d) * model[0].weight)
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)


def test_compile_trains_like_eager(cli, tmp_path):
    small = [
        *TINY, "data.image_size=8", "data.train_size=32", "data.val_size=16",
        "data.test_size=16", "model.depth=1", "model.width=2", "train.log_every=1",
    ]  # fmt: skip
    eager = cli("train", *small, f"run.dir={tmp_path}", "run.name=e")
    compiled = cli("train", *small, f"run.dir={tmp_path}", "run.name=c", "train.compile=true",
                   "train.progress=plain")  # fmt: skip
    assert eager.code == 0 and compiled.code == 0, compiled.err
    assert "torch.compile failed" not in compiled.out
    e_train, e_val = losses(tmp_path / "e")
    c_train, c_val = losses(tmp_path / "c")
    assert close(c_train, e_train, 1e-4) and close(c_val, e_val, 1e-4)


def test_compile_failure_falls_back_to_eager_with_a_message(cli, tmp_path, monkeypatch, plain):
    def broken_compile(model, **kw):
        def run(*args, **kwargs):
            raise RuntimeError("backend exploded")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    r = cli("train", *TWO_EPOCHS, f"run.dir={tmp_path}", "train.compile=true",
            "train.progress=plain")  # fmt: skip
    assert r.code == 0, r.err
    assert "torch.compile failed on SimpleCNN (RuntimeError: backend exploded)" in r.out
    assert losses(r.run_dir) == losses(plain)


def test_checkpoint_segments_never_start_with_an_inplace_op():
    blocks = [nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1), nn.ReLU(inplace=True)] * 5
    segments = _segments(blocks)
    assert sum(len(s) for s in segments) == len(blocks)
    assert all(not getattr(s[0], "inplace", False) for s in segments)


def test_timm_models_use_their_own_switch():
    model = timm.create_model("resnet18", num_classes=2)
    note = enable_activation_checkpointing(model, "resnet18")
    assert "set_grad_checkpointing" in note and model.grad_checkpointing


def test_a_model_without_stages_is_refused():
    with pytest.raises(ConfigError, match="no set_grad_checkpointing"):
        enable_activation_checkpointing(nn.Linear(2, 2), "linear")


def test_sync_bn_on_the_cpu_alone_is_a_note(cli, tmp_path):
    r = cli("train", *TINY, f"run.dir={tmp_path}", "train.sync_bn=true", "train.progress=plain")
    assert r.code == 0, r.err
    assert "train.sync_bn: one process" in r.out


# A small training step, repeated: the minor page faults of ten steps once it has settled.
_STEPS = """
import resource, sys, torch
from torch import nn
from visiontrain.engine.host_memory import keep_freed_memory

applied = keep_freed_memory(), keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2))
x, y = torch.randn(16, 3, 64, 64), torch.zeros(16, dtype=torch.long)

def step():
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()

for _ in range(25):  # the heap settles
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(*applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults_of_ten_steps(env: dict[str, str]) -> tuple[list[str], int]:
    proc = subprocess.run(
        [sys.executable, "-c", _STEPS], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr
    *applied, faults = proc.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(not host_memory.glibc_malloc(), reason="a glibc malloc setting")
def test_cpu_runs_reuse_freed_host_memory_without_page_faults():
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV}
    applied, kept = _faults_of_ten_steps(env)
    assert applied == ["True", "True"]  # and a second call is a no-op that says so
    applied, default = _faults_of_ten_steps({**env, host_memory.ENV: "default"})
    assert applied == ["False", "False"]
    # glibc's defaults give each step's activations (8 MB each) back to the kernel and
    # fault them in again, ~10,000 pages a step here; kept, the settled steps find them in
    # malloc's free lists.
    assert default > 10 * 2_000
    assert kept < default / 20
