"""``train.strategy=fsdp``: FSDP2 on the CPU (Gloo, two processes) and sharded checkpoints.

The two-process runs share one config (:data:`FSDP_RUN`): 640 training images, 16 a
process per micro-batch, two micro-batches accumulated, clipped: 10 updates an epoch, 20
in the two epochs, each logged.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from test_distributed import (
    HELPERS,
    assert_metrics_equal,
    finish,
    sigterm_rank_one,
    summary,
    torchrun,
)
from visiontrain.engine import sharded
from visiontrain.engine.fsdp import mixed_precision, shard_units
from visiontrain.engine.sharded import read_sharded, read_state
from visiontrain.models.dense import TinyNet
from visiontrain.models.simple_cnn import SimpleCNN
from visiontrain.rundir import is_sharded

FSDP_RUN = [
    "data.image_size=16",
    "data.train_size=640",
    "data.val_size=41",
    "data.test_size=39",
    "data.batch_size=16",
    "data.defect_rate=0.25",
    "model.width=4",
    "model.depth=2",
    "train.epochs=2",
    "train.accumulate=2",
    "train.grad_clip_norm=0.5",
    "train.ema=true",
    "train.ema_decay=0.9",
    "train.activation_checkpointing=true",
    "train.deterministic=true",
    "train.progress=plain",
    "train.log_every=1",
    "run.report=false",
]
STEPS = 20  # 640 / (2 processes x 16) / 2 accumulated, x 2 epochs


def train2(root: Path, name: str, *extra: str, nproc: int = 2) -> tuple[int, str]:
    proc = torchrun(
        "-m", "visiontrain", "train", *FSDP_RUN, f"run.dir={root}", f"run.name={name}", *extra,
        nproc=nproc,
    )  # fmt: skip
    return finish(proc)


def train_steps(run: Path) -> list[dict]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train_step"]


def tensors(tree: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state, by its path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        out: dict[str, torch.Tensor] = {}
        for key, value in tree.items():
            out.update(tensors(value, f"{prefix}/{key}"))
        return out
    return {}


def assert_bit_identical(a: Path, b: Path) -> None:
    sa, sb = read_sharded(a), read_sharded(b)
    assert sa["counters"] == sb["counters"]
    ta = {
        k: v for part in ("model", "optimizer", "ema") for k, v in tensors(sa[part], part).items()
    }
    tb = {
        k: v for part in ("model", "optimizer", "ema") for k, v in tensors(sb[part], part).items()
    }
    assert ta.keys() == tb.keys() and len(ta) > 20
    unequal = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not unequal, unequal[:5]


# ---------------------------------------------------------------------- unit level


def _names(model: nn.Module, units: list) -> list[str]:
    ids = {id(m): n for n, m in model.named_modules()}
    return ["+".join(ids[id(m)] for m in u) if isinstance(u, list) else ids[id(u)] for u in units]


def test_shard_units_follow_each_family():
    import segmentation_models_pytorch as smp
    import torchvision

    cnn = SimpleCNN(2, 3, 4, 2)
    units, rule = shard_units(cnn)
    # One group per stage: conv-norm-relu x2 and its pool (the 14 layers of features).
    assert _names(cnn, units) == [
        "+".join(f"features.{i}" for i in range(7)),
        "+".join(f"features.{i}" for i in range(7, 14)),
    ]
    assert "simple_cnn" in rule
    resnet = torchvision.models.resnet18()
    assert _names(resnet, shard_units(resnet)[0]) == [
        f"layer{i}.{b}" for i in range(1, 5) for b in range(2)
    ]
    tiny = TinyNet(2, 3, 8)
    assert _names(tiny, shard_units(tiny)[0]) == ["stem", "c3", "c4", "c5"]
    unet = smp.Unet("resnet18", encoder_weights=None, classes=2)
    names = _names(unet, shard_units(unet)[0])
    assert names[:2] == ["encoder.layer1.0", "encoder.layer1.1"]
    assert names[-3:] == ["encoder", "decoder", "segmentation_head"]
    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=3
    )
    names = _names(detector, shard_units(detector)[0])
    assert names[-3:] == ["backbone", "rpn", "roi_heads"] and "backbone.body.1" in names
    vit = torchvision.models.vit_b_16()
    assert len(shard_units(vit)[0]) == 12
    # No rule: the root alone, said so.
    units, rule = shard_units(nn.Sequential(nn.Flatten(), nn.LazyLinear(2)))
    assert units == [] and "root alone" in rule


def test_mixed_precision_follows_train_precision():
    bf16 = mixed_precision("bf16")
    assert bf16.param_dtype == torch.bfloat16 and bf16.reduce_dtype == torch.float32
    full = mixed_precision("32")
    assert full.param_dtype is None and full.reduce_dtype is None


@pytest.mark.parametrize("key", ["train.sync_bn=true", "train.freeze_epochs=1"])
def test_fsdp_refuses_what_it_does_not_compose_with(cli, tmp_path, key):
    r = cli("train", *FSDP_RUN, "train.strategy=fsdp", key, f"run.dir={tmp_path}")
    assert r.code == 2, r.err
    assert f"{key.split('=')[0]} with train.strategy=fsdp" in r.err
    assert not any(tmp_path.iterdir())  # refused before anything was written


# ---------------------------------------------------------------------- one process


def test_one_process_fsdp_writes_sharded_folders_checked_on_load(cli, tmp_path):
    r = cli("train", *FSDP_RUN, "train.strategy=fsdp", "train.epochs=1", f"run.dir={tmp_path}",
            "run.name=one", "train.progress=none")  # fmt: skip
    assert r.code == 0, r.err
    folder = tmp_path / "one" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["best.dcp", "epoch-0001.dcp", "last.dcp"]
    last = folder / "last.dcp"
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "state.pt"]
    manifest = read_state(last)["sharded"]
    assert set(manifest["files"]) == {".metadata", "__0_0.distcp"}
    # A changed byte in a shard is caught by its SHA-256 before anything loads.
    shard = last / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.unlink()  # hard-linked with the epoch folder's copy: replace, do not edit
    shard.write_bytes(bytes(data))
    bad = cli("eval", last, "--split", "val")
    assert bad.code == 2 and "__0_0.distcp differs" in bad.err, bad.err
    # The same for state.pt (its own content hash) and an extra file.
    ok = cli("eval", folder / "epoch-0001.dcp", "--split", "val", "--format", "json")
    assert ok.code == 0, ok.err
    (folder / "epoch-0001.dcp" / "__9_0.distcp").write_bytes(b"x")
    extra = cli("eval", folder / "epoch-0001.dcp", "--split", "val")
    assert extra.code == 2 and "__9_0.distcp was not written with it" in extra.err


def test_a_commit_that_fails_after_the_write_keeps_the_previous_checkpoint(
    cli, tmp_path, monkeypatch
):
    """In-process stand-in for a kill between the write and the rename (stage `written`)."""
    calls = []

    def fail(stage: str, folder: Path) -> None:
        if stage == "written" and folder.name == "last.dcp":
            calls.append(folder)
            if len(calls) == 2:
                raise OSError("simulated crash before the commit")

    monkeypatch.setattr(sharded, "fault_hook", fail)
    args = [*FSDP_RUN, "train.strategy=fsdp", f"run.dir={tmp_path}", "run.name=w",
            "train.progress=none"]  # fmt: skip
    r = cli("train", *args)
    assert r.code == 1 and "simulated crash" in r.err
    folder = tmp_path / "w" / "checkpoints"
    assert (folder / "last.dcp.partial" / "state.pt").is_file()  # complete, not committed
    assert read_state(folder / "last.dcp")["counters"]["global_step"] == 20  # epoch 1
    monkeypatch.setattr(sharded, "fault_hook", None)
    r = cli("train", *args, "run.resume=auto")
    assert r.code == 0, r.err
    assert summary(tmp_path / "w")["global_step"] == 40
    assert not (folder / "last.dcp.partial").exists()


# ---------------------------------------------------------------------- torchrun


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    code, log = train2(root, "f", "train.strategy=fsdp")
    assert code == 0, log[-3000:]
    assert "FSDP: 2 processes (gloo)" in log and "fully_shard on 2 blocks" in log
    return root / "f"


def test_fsdp_and_ddp_give_the_same_losses(fsdp_run, tmp_path):
    code, log = train2(tmp_path, "d")  # train.strategy=ddp, the default
    assert code == 0, log[-3000:]
    ddp, fsdp = train_steps(tmp_path / "d"), train_steps(fsdp_run)
    assert [r["step"] for r in ddp] == [r["step"] for r in fsdp] == list(range(1, STEPS + 1))
    loss_gap = max(abs(a["loss"] - b["loss"]) for a, b in zip(ddp, fsdp, strict=True))
    norm_gap = max(abs(a["grad_norm"] - b["grad_norm"]) for a, b in zip(ddp, fsdp, strict=True))
    print(
        f"max |loss DDP - loss FSDP| over {STEPS} steps: {loss_gap:.3g}; grad norm {norm_gap:.3g}"
    )
    assert loss_gap <= 1e-5 and norm_gap <= 1e-5
    # Clipping acted (the norm over every shard exceeded 0.5) and the runs still agree.
    assert max(r["grad_norm"] for r in fsdp) > 0.5
    # The EMA's validation, evaluated through gathered shards, agrees too.
    assert_metrics_equal(
        summary(tmp_path / "d")["metrics"]["val"], summary(fsdp_run)["metrics"]["val"], 1e-5
    )


def test_a_two_process_fsdp_checkpoint_evaluates_and_resumes_in_one_process(
    fsdp_run, tmp_path, cli
):
    folder = fsdp_run / "checkpoints"
    assert sorted(p.name for p in (folder / "last.dcp").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt",
    ]  # fmt: skip
    one = cli("eval", fsdp_run, "--split", "val", "--format", "json")
    assert one.code == 0, one.err
    assert_metrics_equal(summary(fsdp_run)["metrics"]["val"], json.loads(one.out))
    copy = tmp_path / "c"
    shutil.copytree(fsdp_run, copy)
    r = cli("train", *FSDP_RUN, "train.strategy=fsdp", "train.progress=none", "train.epochs=3",
            f"run.resume={copy / 'checkpoints' / 'epoch-0002.dcp'}")  # fmt: skip
    assert r.code == 0, r.err
    s = summary(copy)
    # Two epochs of 10 updates by two processes, then one of 640 / 16 / 2 = 20 alone.
    assert s["world_size"] == 1 and s["epochs_run"] == 3 and s["global_step"] == 40
    assert read_state(copy / "checkpoints" / "last.dcp")["sharded"]["world_size"] == 1
    # And back: the one-process checkpoint resharded over two processes.
    code, log = train2(copy.parent, "c", "train.strategy=fsdp", "train.epochs=4",
                       "run.resume=auto")  # fmt: skip
    assert code == 0, log[-3000:]
    assert "written by 1 processes, resumed by 2" not in log  # an epoch boundary: no note
    s = summary(copy)
    assert s["world_size"] == 2 and s["epochs_run"] == 4 and s["global_step"] == 50
    assert read_state(copy / "checkpoints" / "last.dcp")["sharded"]["world_size"] == 2


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers in /proc")
def test_sigterm_then_resume_gives_bit_identical_weights(fsdp_run, tmp_path):
    run = tmp_path / "s"
    proc = torchrun(
        "-m", "visiontrain", "train", *FSDP_RUN, "train.strategy=fsdp", f"run.dir={tmp_path}",
        "run.name=s",
    )  # fmt: skip
    code, log = sigterm_rank_one(proc, run, steps=5)
    assert code != 0 and log.count("stopped by signal") == 2, log[-3000:]
    stopped = read_state(run / "checkpoints" / "last.dcp")["counters"]["global_step"]
    assert 0 < stopped < STEPS
    code, log = train2(tmp_path, "s", "train.strategy=fsdp", "run.resume=auto")
    assert code == 0, log[-3000:]
    assert f"step {stopped})" in log
    assert_bit_identical(run / "checkpoints" / "last.dcp", fsdp_run / "checkpoints" / "last.dcp")


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="SIGKILL of a torchrun worker")
def test_sigkill_inside_a_sharded_commit_leaves_the_previous_checkpoint(tmp_path, cli):
    """A real SIGKILL of rank 0 at the worst moment: the previous last.dcp renamed away."""
    proc = torchrun(
        str(HELPERS / "fsdp_kill_probe.py"), "set_aside", "last.dcp", "1", *FSDP_RUN,
        "train.strategy=fsdp", f"run.dir={tmp_path}", "run.name=k",
    )  # fmt: skip
    code, log = finish(proc)
    assert code != 0, log[-3000:]
    folder = tmp_path / "k" / "checkpoints"
    # Killed between the two renames of epoch 2's commit: no last.dcp on disk ...
    assert not (folder / "last.dcp").exists() and (folder / "last.dcp.old").is_dir()
    assert (folder / "last.dcp.partial").is_dir()
    # ... and whoever looks for it finds the previous one (epoch 1), whole and verified.
    assert is_sharded(folder / "last.dcp")
    state = read_sharded(folder / "last.dcp")
    assert state["counters"]["global_step"] == STEPS // 2
    r = cli("eval", folder / "last.dcp", "--split", "val", "--format", "json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["samples"] == 41
    r = cli("train", *FSDP_RUN, "train.strategy=fsdp", "train.progress=none",
            f"run.dir={tmp_path}", "run.name=k", "run.resume=auto")  # fmt: skip
    assert r.code == 0, r.err
    assert summary(tmp_path / "k")["epochs_run"] == 2
    assert not math.isnan(summary(tmp_path / "k")["metrics"]["val"]["loss"])


def test_async_sharded_saves_equal_synchronous_ones(fsdp_run, tmp_path):
    """run.async_save under fsdp: each rank's writer thread saves on a group of its own."""
    code, log = train2(
        tmp_path, "a", "train.strategy=fsdp", "run.async_save=true", "run.save_every_steps=3"
    )
    assert code == 0, log[-3000:]
    for name in ("last.dcp", "best.dcp"):
        assert_bit_identical(fsdp_run / "checkpoints" / name, tmp_path / "a" / "checkpoints" / name)
    # The periodic saves on the writer threads changed nothing the training computed.
    assert [r["loss"] for r in train_steps(tmp_path / "a")] == [
        r["loss"] for r in train_steps(fsdp_run)
    ]
