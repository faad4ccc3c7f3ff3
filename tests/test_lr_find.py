"""The LR range test: the core on a quadratic of known curvature, the CLI, optim.lr=find."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console

from conftest import TINY
from visiontrain.config import build_config
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.engine.parts import build_parts
from visiontrain.seed import capture_rng
from visiontrain.tools.lr_find import find_lr, range_test, run_on_parts, suggest

# 0.5*A*(w - W0)^2: plain GD contracts the error by |1 - lr*A| per step, so lr = 1/A = 0.1
# solves it in one step and any lr above 2/A = 0.2 diverges.
A, W0 = 10.0, 1.0


def quadratic_step(noise: float = 0.0, seed: int = 0):
    """A ``step_fn`` doing SGD on the quadratic; ``noise`` jitters the target per step."""
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=1.0)
    gen = torch.Generator().manual_seed(seed)

    def step(lr: float) -> torch.Tensor:
        for group in opt.param_groups:
            group["lr"] = lr
        target = W0 + noise * torch.randn(1, generator=gen)
        loss = 0.5 * A * ((w - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    return step


@pytest.mark.parametrize(("noise", "seed"), [(0.0, 0), (0.01, 0), (0.01, 1)])
def test_range_test_finds_the_quadratics_best_lr_and_stops_on_divergence(noise, seed):
    # 50 steps over 8 decades: each step multiplies the LR by 1.46.
    res = range_test(quadratic_step(noise, seed), 1e-7, 10.0, 50)
    best = 1.0 / A
    assert best / 3 <= res.suggestion <= best * 3
    assert res.suggestion_rule == "steepest descent"
    assert res.stopped_early and res.reason == "loss diverged"
    assert 2.0 / A < res.last_lr < 10.0  # it stops only once GD diverges, and before the end
    assert len(res.lrs) == len(res.losses) == len(res.smoothed) < 50
    assert res.lrs[0] == pytest.approx(1e-7)
    assert all(b > a for a, b in zip(res.lrs, res.lrs[1:], strict=False))
    assert res.min_loss_lr_div10 == pytest.approx(
        res.lrs[res.smoothed.index(min(res.smoothed))] / 10
    )
    # Bias correction: the first smoothed value is the first loss itself.
    assert res.smoothed[0] == pytest.approx(res.losses[0])


def test_range_test_stops_on_a_non_finite_loss():
    def step(lr: float) -> torch.Tensor:
        return torch.tensor(math.nan if lr > 1e-2 else 1.0 / (1.0 + 1e3 * lr))

    res = range_test(step, 1e-6, 1.0, 30)
    assert res.stopped_early and res.reason == "loss not finite"
    assert all(math.isfinite(v) for v in res.losses + res.smoothed)
    assert res.lrs[-1] <= 1e-2 < res.last_lr
    assert 1e-6 <= res.suggestion <= 1e-2
    json.dumps(res.to_dict(), allow_nan=False)  # the curve holds no NaN or inf


def test_range_test_refuses_a_loss_that_is_never_finite():
    from visiontrain.errors import UserError

    with pytest.raises(UserError, match="not finite at the first lr"):
        range_test(lambda lr: torch.tensor(math.inf), 1e-6, 1.0, 10)


def test_suggest_falls_back_to_min_loss_over_10_without_a_descent():
    lrs = [10.0**e for e in range(-6, 0)]
    lr, rule = suggest(lrs, [1.0, 1.1, 1.2, 1.3, 1.4, 1.5], skip=1)
    assert lr == pytest.approx(1e-7) and rule.startswith("min-loss/10")


def test_run_on_parts_restores_model_optimizer_and_rng(tmp_path):
    cfg = build_config(overrides=[*TINY, f"run.dir={tmp_path}"])
    parts = build_parts(cfg)
    model_before = {k: v.clone() for k, v in parts.model.state_dict().items()}
    optim_before = parts.optimizer.state_dict()
    rng_before = capture_rng()
    res = run_on_parts(cfg, parts, parts.optimizer, 1e-5, 1.0, 8)
    assert len(res.lrs) >= 1
    after = parts.model.state_dict()
    assert after.keys() == model_before.keys()
    assert all(torch.equal(after[k], model_before[k]) for k in after)  # BN stats included
    assert all(p.grad is None for p in parts.model.parameters())
    optim_after = parts.optimizer.state_dict()
    assert (
        optim_after["state"] == {} and optim_after["param_groups"] == optim_before["param_groups"]
    )
    _assert_same_rng(capture_rng(), rng_before)


def test_find_lr_leaves_the_global_rng_alone(tmp_path):
    cfg = build_config(overrides=[*TINY, f"run.dir={tmp_path}"])
    torch.manual_seed(1234)
    before = capture_rng()
    res = find_lr(cfg, Console(quiet=True), 1e-5, 1.0, 6)
    assert res.config is not None and res.config["optim"]["lr"] == pytest.approx(1e-3)
    _assert_same_rng(capture_rng(), before)
    assert not any(tmp_path.iterdir())  # the driver writes nothing; the verb does


def _nothing_written(root: Path) -> bool:
    return not root.exists() or not any(root.rglob("*"))


def _assert_same_rng(a: dict, b: dict) -> None:
    assert a["python"] == b["python"]
    assert a["numpy"][0] == b["numpy"][0] and a["numpy"][2:] == b["numpy"][2:]
    assert torch.equal(a["numpy"][1], b["numpy"][1])
    assert torch.equal(a["torch"], b["torch"])


def test_lr_find_cli_writes_json_and_plot(cli, tmp_path):
    res = cli("lr-find", *TINY, f"run.dir={tmp_path}", "--steps", "20")
    assert res.code == 0, res.err
    folder = res.run_dir
    assert folder.parent == tmp_path and folder.name.startswith("lr-find-classification-defects-")
    assert "suggested lr" in res.out and "min-loss/10" in res.out
    data = json.loads((folder / "lr_find.json").read_text())
    png = (folder / "lr_find.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    n = len(data["lrs"])
    assert 1 <= n <= 20 and len(data["losses"]) == len(data["smoothed"]) == n
    assert data["steps"] == 20 and data["start"] == pytest.approx(1e-7) and data["end"] == 10.0
    assert 1e-7 <= data["suggestion"] <= 10.0
    assert data["min_loss_lr_div10"] > 0
    assert isinstance(data["stopped_early"], bool) and data["reason"]
    assert data["config"]["data"]["name"] == "defects"
    assert all(math.isfinite(v) for v in data["losses"])
    # A named run folder is used as given.
    res = cli("lr-find", *TINY, f"run.dir={tmp_path}", "run.name=probe", "--steps", "5")
    assert res.code == 0, res.err
    assert res.run_dir == tmp_path / "probe" and (tmp_path / "probe" / "lr_find.json").is_file()


def test_train_with_lr_find_equals_a_run_with_that_lr(cli, tmp_path):
    # Dropout draws from the global RNG while training: the test's RNG use must not leak.
    tiny = [*TINY, "model.dropout=0.3"]
    found = cli("train", *tiny, "optim.lr=find", f"run.dir={tmp_path}", "run.name=found")
    assert found.code == 0, found.err
    assert "suggested lr" in found.out
    run = tmp_path / "found"
    data = json.loads((run / "lr_find.json").read_text())
    assert (run / "lr_find.png").is_file()
    assert data["steps"] == 100 and data["config"]["optim"]["lr"] == "find"
    lr = yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"]
    assert isinstance(lr, float) and lr == data["suggestion"]

    given = cli("train", *tiny, f"optim.lr={lr!r}", f"run.dir={tmp_path}", "run.name=given")
    assert given.code == 0, given.err
    a = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "given" / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # Resuming keeps the run's learning rate; a new test would change it.
    res = cli(
        "train", *TINY, "optim.lr=find", f"run.dir={tmp_path}", "run.name=found", "run.resume=auto"
    )
    assert res.code == 2 and "already fixed" in res.err


def test_train_check_accepts_lr_find_without_running_it(cli, tmp_path):
    res = cli(
        "train", "--check", *TINY, "optim.lr=find", "schedule.name=onecycle", f"run.dir={tmp_path}"
    )
    assert res.code == 0, res.err
    assert "suggested lr" not in res.out
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--start", "1", "--end", "0.1"], "--start 1 must be below --end 0.1"),
        (["--start", "1e-3", "--end", "1e-3"], "must be below --end"),
        (["--start", "0"], "must be positive"),
        (["--end", "-1"], "must be positive"),
        (["--steps", "4"], "--steps 4 is too few"),
        (["optim.lr=fnd"], "`optim.lr` = 'fnd'"),
    ],
)
def test_lr_find_bad_input_exits_2(cli, tmp_path, args, expected):
    overrides = [a for a in args if "=" in a]
    options = [a for a in args if "=" not in a]
    res = cli("lr-find", *TINY, *overrides, f"run.dir={tmp_path}", *options)
    assert res.code == 2
    assert expected in res.err
    assert _nothing_written(tmp_path)


def test_train_refuses_a_misspelt_find(cli, tmp_path):
    res = cli("train", *TINY, "optim.lr=fnd", f"run.dir={tmp_path}")
    assert res.code == 2
    assert "`optim.lr` = 'fnd'" in res.err and "`find`" in res.err and "number" in res.err
    assert _nothing_written(tmp_path)
