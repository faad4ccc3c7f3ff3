"""Every optimizer, schedule, precision, accumulation and clipping option runs, and the
schedules follow PyTorch's own schedulers step for step."""

import json

import pytest
import torch
from torch.optim import lr_scheduler

from conftest import TINY
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.engine.optim import list_optimizers, param_groups
from visiontrain.engine.schedules import list_schedules


def _train_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


@pytest.mark.parametrize("name", list_optimizers())
def test_every_optimizer_trains(cli, tmp_path, name):
    res = cli(
        "train", *TINY, f"optim.name={name}", "optim.weight_decay=0.01", f"run.dir={tmp_path}"
    )
    assert res.code == 0, res.err


@pytest.mark.parametrize("precision", ["32", "bf16", "fp16"])
def test_every_precision_trains(cli, tmp_path, precision):
    res = cli(
        "train",
        *TINY,
        f"train.precision={precision}",
        "train.grad_clip_norm=1.0",
        f"run.dir={tmp_path}",
    )
    assert res.code == 0, res.err
    state = load_checkpoint(res.run_dir / "checkpoints" / "last.pt")
    assert state["scaler"] is not None
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.parametrize(
    "extra",
    [
        ["train.accumulate=3"],
        ["train.grad_clip_norm=0.5"],
        ["train.grad_clip_value=0.01"],
        ["train.channels_last=true"],
        ["train.progress=bar"],
        ["train.progress=plain", "train.eval_every=2", "train.epochs=3"],
        ["loss.name=bce_with_logits", "loss.label_smoothing=0.1"],
        ["loss.label_smoothing=0.1", "loss.class_weights=balanced"],
        ["model.norm=layer", "model.init=xavier"],
        ["model.norm=group", "model.init=lecun"],
        ["model.norm=none", "model.init=gpt"],
        ["train.early_stopping.patience=1", "train.epochs=4", "train.monitor=val/accuracy"],
    ],
    ids=lambda e: " ".join(e),
)
def test_loop_options_train(cli, tmp_path, extra):
    res = cli("train", *TINY, *extra, f"run.dir={tmp_path}")
    assert res.code == 0, res.err


def test_grad_clip_norm_logs_the_pre_clip_norm(cli, tmp_path):
    res = cli(
        "train", *TINY, "train.grad_clip_norm=1e-6", "train.log_every=1", f"run.dir={tmp_path}"
    )
    assert res.code == 0
    norms = [r["grad_norm"] for r in _train_records(res.run_dir) if r.get("kind") == "train_step"]
    assert min(norms) > 1e-6  # what was measured before clipping, not the clipped value


def test_early_stopping_stops_and_restores_best(cli, tmp_path):
    res = cli(
        "train",
        *TINY,
        "train.epochs=8",
        "optim.lr=1e-9",
        "train.early_stopping.patience=2",
        "train.early_stopping.min_delta=1.0",
        f"run.dir={tmp_path}",
    )
    assert res.code == 0
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert summary["stopped_early"] is True
    assert summary["epochs_run"] == 3  # epoch 1 sets the bar, 2 and 3 fail to beat it by 1.0
    records = _train_records(res.run_dir)
    val = [r["loss"] for r in records if r["split"] == "val" and r.get("kind") == "eval"]
    assert len(val) == 3
    assert summary["best_epoch"] == val.index(min(val)) + 1  # 1-based
    assert summary["metrics"]["val"]["loss"] == pytest.approx(min(val))


def test_no_decay_for_norm_and_bias():
    from visiontrain.models import create_model

    model = create_model("simple_cnn", num_classes=2, in_chans=1, width=4)
    decay, no_decay = param_groups(model, 0.1, decay_norm_bias=False)
    assert all(p.ndim > 1 for p in decay["params"])
    assert all(p.ndim <= 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    (only,) = param_groups(model, 0.1, decay_norm_bias=True)
    assert len(only["params"]) == len(list(model.parameters()))


def _reference(name, opt, updates_per_epoch, epochs, val_losses, min_lr=0.0):
    """The LR in force at each update, stepping PyTorch's scheduler at its granularity."""
    total = updates_per_epoch * epochs
    per_step = False
    if name == "step":
        sched = lr_scheduler.StepLR(opt, 1, gamma=0.5)
    elif name == "exponential":
        sched = lr_scheduler.ExponentialLR(opt, gamma=0.8)
    elif name == "cosine":
        sched = lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=min_lr)
    elif name == "cosine_restarts":
        sched = lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2, eta_min=min_lr)
    elif name == "onecycle":
        sched, per_step = lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=total), True
    elif name == "warmup_cosine":
        warm = updates_per_epoch
        sched = lr_scheduler.SequentialLR(
            opt,
            [
                lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warm),
                lr_scheduler.CosineAnnealingLR(opt, T_max=total - warm, eta_min=min_lr),
            ],
            milestones=[warm],
        )
        per_step = True
    elif name == "plateau":
        sched = lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    else:
        sched = None
    lrs = []
    for epoch in range(epochs):
        for _ in range(updates_per_epoch):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if per_step:
                sched.step()
        if name == "plateau":
            sched.step(val_losses[epoch])
        elif sched is not None and not per_step:
            sched.step()
    return lrs


SCHEDULE_ARGS = {
    "step": ["schedule.step_size=1", "schedule.gamma=0.5"],
    "exponential": ["schedule.gamma=0.8"],
    "cosine": ["schedule.min_lr=1e-4"],
    "cosine_restarts": ["schedule.t0=2", "schedule.min_lr=1e-4"],
    "onecycle": ["schedule.max_lr=0.01"],
    "warmup_cosine": ["schedule.warmup_epochs=1", "schedule.min_lr=1e-4"],
    "plateau": ["schedule.patience=0", "schedule.factor=0.5", "optim.lr=1e-6", "model.norm=none"],
    "none": [],
}


@pytest.mark.parametrize("name", list_schedules())
def test_schedule_lr_sequence_matches_pytorch(cli, tmp_path, name):
    epochs = 4
    res = cli(
        "train",
        *TINY,
        f"schedule.name={name}",
        *SCHEDULE_ARGS[name],
        f"train.epochs={epochs}",
        "train.log_every=1",
        "optim.name=sgd",
        f"run.dir={tmp_path}",
    )
    assert res.code == 0, res.err
    records = _train_records(res.run_dir)
    got = [r["lr"] for r in records if r.get("kind") == "train_step"]
    val_losses = [r["loss"] for r in records if r["split"] == "val"]
    base_lr = records[0]["hparams"]["lr"]
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base_lr)
    want = _reference(
        name,
        opt,
        len(got) // epochs,
        epochs,
        val_losses,
        min_lr=1e-4 if "schedule.min_lr=1e-4" in SCHEDULE_ARGS[name] else 0.0,
    )
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    if name == "plateau":
        assert min(got) < max(got)  # the LR was actually reduced


def test_accumulation_equals_one_big_batch(cli, tmp_path):
    common = [
        *TINY,
        "data.train_size=128",
        "data.augment=none",
        "model.norm=none",
        "optim.name=sgd",
        "optim.lr=0.1",
        "train.epochs=1",
        f"run.dir={tmp_path}",
    ]
    big = cli("train", *common, "data.batch_size=128", "run.name=big")
    small = cli("train", *common, "data.batch_size=32", "train.accumulate=4", "run.name=small")
    assert big.code == small.code == 0
    a = load_checkpoint(tmp_path / "big" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "small" / "checkpoints" / "last.pt")
    assert a["counters"]["global_step"] == b["counters"]["global_step"] == 1
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, atol=1e-6, rtol=0)


def test_accumulation_remainder_still_updates(cli, tmp_path):
    # 6 batches with accumulate=4: one update of 4 micro-batches and one of 2.
    res = cli("train", *TINY, "train.accumulate=4", f"run.dir={tmp_path}")
    assert res.code == 0
    state = load_checkpoint(res.run_dir / "checkpoints" / "last.pt")
    assert state["counters"]["global_step"] == 2
