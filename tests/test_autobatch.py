"""``data.batch_size=auto`` and ``optim.lr_scale``: the search with a fake memory limit.

No GPU is needed: the "try one batch size" function and the memory reading are injected
(an out-of-memory error above a size, a peak that grows linearly with the batch), and
the search's wiring runs the real training step on the CPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from tests.conftest import TINY

from visiontrain.config import build_config
from visiontrain.engine import autobatch
from visiontrain.engine import parts as parts_mod
from visiontrain.engine.autobatch import (
    HEADROOM,
    MAX_BATCH,
    StepTrial,
    agree,
    batch_from_checkpoint,
    find_batch_size,
    search_batch,
)
from visiontrain.engine.distributed import Dist
from visiontrain.engine.parts import build_parts, resolve_batch_size, resolve_lr_scale, scaled_lr
from visiontrain.errors import ConfigError

GIB = 2**30


def oom_above(limit: int, fixed: int = GIB, per_sample: int = 2**20, tried: list | None = None):
    """A try that runs up to ``limit`` and reports a peak linear in the batch."""

    def try_batch(n: int) -> int:
        if tried is not None:
            tried.append(n)
        if n > limit:
            raise torch.OutOfMemoryError(f"fake: {n} does not fit")
        return fixed + per_sample * n

    return try_batch


class FakeMemory:
    """A MemoryMeter whose peak is ``fixed + per_sample * n`` for the batch last tried."""

    def __init__(self, total: int, fixed: int = GIB, per_sample: int = 2**20) -> None:
        self._total, self.fixed, self.per_sample = total, fixed, per_sample
        self.n = 0
        self.released = 0

    def total(self) -> int:
        return self._total

    def reset(self) -> None:
        pass

    def peak(self) -> int:
        return self.fixed + self.per_sample * self.n

    def release(self) -> None:
        self.released += 1


class FakeDist(Dist):
    """Two processes whose other rank answered ``other``."""

    def __init__(self, other: int) -> None:
        super().__init__(rank=0, world_size=2)
        self.other = other

    def gather(self, items: list) -> list:
        return [*items, self.other]


# ------------------------------------------------------------------ the search itself


@pytest.mark.parametrize("limit", [1, 2, 3, 37, 100, 1000, 4095])
def test_doubling_then_bisection_finds_the_exact_largest_size(limit):
    tried: list[int] = []
    result = search_batch(oom_above(limit, tried=tried), cap=MAX_BATCH, budget=2**62)
    assert result.batch == result.largest_fit == limit
    assert not result.capped
    # Doubling from 2 up to the first failure, then only sizes between the bounds.
    first_fail = next(n for n in tried if n > limit)
    doubling = tried[: tried.index(first_fail) + 1]
    assert doubling == [2 * 2**i for i in range(len(doubling))]
    assert all(limit // 2 < n < first_fail for n in tried[len(doubling) :])
    # Bisection: no more tries than the bits between the bounds, plus the doubling.
    assert len(tried) <= len(doubling) + math.ceil(math.log2(max(2, first_fail)))


def test_nothing_fits_is_refused_with_the_fixes():
    with pytest.raises(ConfigError, match="not even a batch of 1") as err:
        search_batch(oom_above(0), cap=MAX_BATCH, budget=2**62)
    assert "train.activation_checkpointing=true" in str(err.value)


@pytest.mark.parametrize(
    ("fixed", "per_sample", "limit"),
    [(GIB, 2**20, 4000), (10 * GIB, 50 * 2**20, 300), (2 * GIB, 3 * 2**20 + 12345, 2500)],
)
def test_headroom_keeps_the_peak_under_90_percent(fixed, per_sample, limit):
    # The device holds exactly what `limit` needs: the step runs up to there, but the
    # chosen batch must leave 10% of the device free.
    total = fixed + per_sample * limit
    budget = int(HEADROOM * total)
    result = search_batch(oom_above(limit, fixed, per_sample), cap=MAX_BATCH, budget=budget)
    assert result.largest_fit == limit
    expected = (budget - fixed) // per_sample  # the largest b with fixed + b*s <= budget
    assert result.batch == expected
    assert result.peaks[result.batch] <= budget < fixed + per_sample * (result.batch + 1)
    assert not result.over_budget
    assert f"{limit} ran, lowered to keep 10% of the GPU free" in autobatch.describe(result)


def test_headroom_with_memory_not_linear_in_the_batch_stays_under_budget():
    def peak(n: int) -> int:
        return GIB + 2**20 * n + 2**12 * n * n  # attention-like growth

    def try_batch(n: int) -> int:
        if n > 900:
            raise torch.OutOfMemoryError("fake")
        return peak(n)

    budget = int(HEADROOM * peak(900))
    result = search_batch(try_batch, cap=MAX_BATCH, budget=budget)
    assert peak(result.batch) <= budget
    # Within a few percent of the true answer after the measured refinements.
    best = max(n for n in range(1, 901) if peak(n) <= budget)
    assert result.batch >= 0.95 * best


def test_search_stops_at_the_cap():
    tried: list[int] = []
    result = search_batch(oom_above(10_000, tried=tried), cap=300, budget=2**62)
    assert result.batch == 300 and result.capped
    assert max(tried) == 300 and tried[-1] == 300
    assert "(the cap: this process's share of the training split" in autobatch.describe(result)


def test_the_rank_with_the_least_memory_decides():
    assert agree(96, Dist()) == 96  # one process: its own answer
    assert agree(96, FakeDist(other=40)) == 40
    assert agree(24, FakeDist(other=40)) == 24


def test_another_rank_failing_fails_every_rank():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    meter = FakeMemory(total=100 * GIB)
    # This rank's search succeeds; the other found nothing (it sends 0).
    with pytest.raises(ConfigError, match="another process"):
        find_batch_size(oom_above(50), model, optimizer, 64, meter, FakeDist(other=0))
    result = find_batch_size(oom_above(50), model, optimizer, 64, meter, FakeDist(other=33))
    assert result.batch == 33 and result.largest_fit == 50


def test_sync_batchnorm_runs_locally_during_the_search():
    # Ranks search different sizes at different moments: no collective may run.
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    )
    plain = torch.nn.BatchNorm2d(4)
    x = torch.randn(4, 3, 8, 8)
    with autobatch.local_norms(model):
        assert "forward" in vars(model[1])
        torch.testing.assert_close(model(x), plain(model[0](x)))
    assert "forward" not in vars(model[1])


# ------------------------------------------------------------------ on the real step (CPU)


@pytest.fixture
def tiny_parts():
    cfg = build_config(None, [*TINY, "train.device=cpu"])
    return cfg, build_parts(cfg)


def _oom_in_backward(model: torch.nn.Module, limit: int, meter: FakeMemory) -> None:
    """Out of memory halfway through backward above ``limit``: some gradients exist."""
    first = next(p for p in model.parameters() if p.requires_grad)
    seen = {"n": 0}

    def forward_hook(_module, args, _out):
        seen["n"] = meter.n = args[0].shape[0]

    def grad_hook(grad):
        if seen["n"] > limit:
            raise torch.OutOfMemoryError(f"fake: batch {seen['n']} does not fit")
        return grad

    model.register_forward_hook(forward_hook)
    first.register_hook(grad_hook)


def test_search_on_the_real_step_restores_weights_optimizer_and_rngs(tiny_parts, monkeypatch):
    cfg, parts = tiny_parts
    model, optimizer = parts.model, parts.optimizer
    meter = FakeMemory(total=100 * GIB)
    _oom_in_backward(model, 40, meter)
    monkeypatch.setattr(parts_mod, "CudaMemory", lambda device: meter)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    optim_state = optimizer.state_dict()
    rng = torch.get_rng_state()
    cfg.data.batch_size = "auto"

    note = resolve_batch_size(cfg, parts.bundle, parts.task, model, optimizer, parts.device, Dist())

    assert cfg.data.batch_size == 40
    assert note.startswith("data.batch_size=auto: 40 (the largest batch whose training step ran")
    assert meter.released >= 1  # the failed tries were cleaned up
    after = model.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert all(p.grad is None for p in model.parameters())
    assert optimizer.state_dict()["state"] == optim_state["state"] == {}
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_cap_is_each_process_share_of_the_training_split(tiny_parts, monkeypatch):
    cfg, parts = tiny_parts
    meter = FakeMemory(total=100 * GIB)
    _oom_in_backward(parts.model, 10_000, meter)
    monkeypatch.setattr(parts_mod, "CudaMemory", lambda device: meter)
    args = (cfg, parts.bundle, parts.task, parts.model, parts.optimizer, parts.device)
    cfg.data.batch_size = "auto"
    resolve_batch_size(*args, Dist())
    assert cfg.data.batch_size == len(parts.bundle.train) == 96
    cfg.data.batch_size = "auto"
    note = resolve_batch_size(*args, FakeDist(other=4096))
    assert cfg.data.batch_size == 48  # 96 images over 2 processes
    assert "the smallest over 2 processes" in note


def test_the_extra_memory_of_ddp_and_ema_counts_against_the_budget(tiny_parts):
    _, parts = tiny_parts
    params = sum(p.numel() * 4 for p in parts.model.parameters())
    assert autobatch.held_bytes(parts.model, ddp=False, ema=False) == 0
    assert autobatch.held_bytes(parts.model, ddp=True, ema=False) == params
    assert autobatch.held_bytes(parts.model, ddp=False, ema=True) >= params


# ------------------------------------------------------------------ through the CLI


def test_auto_on_the_cpu_is_refused_with_the_fix(cli, tmp_path):
    res = cli("train", *TINY, "train.device=cpu", "data.batch_size=auto", f"run.dir={tmp_path}")
    assert res.code == 2
    assert "data.batch_size=auto" in res.err and "GPU memory" in res.err
    assert "data.batch_size=64" in res.err and "Traceback" not in res.err
    assert not list(tmp_path.rglob("config.yaml"))


def test_tools_that_read_batches_at_a_given_size_refuse_auto(cli, tmp_path):
    res = cli("bench", "loader", *TINY, "data.batch_size=auto", f"run.dir={tmp_path}")
    assert res.code == 2
    assert "data.batch_size=auto" in res.err and "Pass an integer" in res.err


@pytest.mark.parametrize(
    ("items", "key"),
    [
        (["optim.lr_scale=linear"], "optim.lr_batch"),
        (["optim.lr_batch=256"], "optim.lr_scale"),
        (["optim.lr=find", "optim.lr_scale=sqrt", "optim.lr_batch=64"], "optim.lr=find"),
        (["data.batch_size=0"], "data.batch_size"),
    ],
)
def test_lr_scale_and_batch_size_validation(cli, tmp_path, items, key):
    res = cli("train", "--check", *TINY, *items, f"run.dir={tmp_path}")
    assert res.code == 2
    assert key in res.err and "Traceback" not in res.err


def test_lr_scale_arithmetic():
    assert scaled_lr(1e-3, "linear", 256, 64) == pytest.approx(4e-3)
    assert scaled_lr(1e-3, "sqrt", 256, 64) == pytest.approx(2e-3)
    assert scaled_lr(1e-3, "linear", 32, 64) == pytest.approx(5e-4)
    assert scaled_lr(1e-3, "none", 256, 64) == 1e-3


def test_lr_scale_uses_the_batch_per_update_and_is_idempotent():
    cfg = build_config(
        None,
        [
            "data.batch_size=32",
            "train.accumulate=2",
            "optim.lr=0.001",
            "optim.lr_scale=linear",
            "optim.lr_batch=64",
        ],
    )
    note = resolve_lr_scale(cfg, world_size=4)  # 32 x 4 processes x 2 = 256 per update
    assert cfg.optim.lr == pytest.approx(4e-3) and cfg.optim.lr_batch == 256
    assert "256 per update (32 x 4 processes x 2 accumulated)" in note
    # The recorded pair describes itself: resolving it again changes nothing.
    resolve_lr_scale(cfg, world_size=4)
    assert cfg.optim.lr == pytest.approx(4e-3) and cfg.optim.lr_batch == 256
    with pytest.raises(ConfigError, match="outside"):
        resolve_lr_scale(
            build_config(None, ["optim.lr=1", "optim.lr_scale=linear", "optim.lr_batch=1"]),
            world_size=1,
        )


def test_batch_from_checkpoint():
    assert batch_from_checkpoint({"config": {"data": {"batch_size": 40}}}, "x.pt") == 40
    with pytest.raises(ConfigError, match="records no batch size"):
        batch_from_checkpoint({"config": {"data": {"batch_size": "auto"}}}, "x.pt")


class _FakeTrial(StepTrial):
    """The real step, a fake device: out of memory above 40, linear peaks."""

    def __init__(self, make_step, sample, meter, extra_bytes=0) -> None:
        super().__init__(make_step, sample, FakeMemory(total=100 * GIB), extra_bytes)

    def __call__(self, n: int) -> int:
        self.meter.n = n
        if n > 40:
            raise torch.OutOfMemoryError(f"fake: {n} does not fit")
        return super().__call__(n)


def test_config_yaml_records_the_chosen_batch_and_lr_and_a_resume_keeps_them(
    cli, tmp_path, monkeypatch
):
    monkeypatch.setattr(parts_mod, "refuse_on_cpu", lambda device: None)
    monkeypatch.setattr(parts_mod, "StepTrial", _FakeTrial)
    monkeypatch.setattr(parts_mod, "CudaMemory", lambda device: None)
    items = [*TINY, "train.device=cpu", "data.batch_size=auto", "optim.lr=0.001"]
    items += ["optim.lr_scale=linear", "optim.lr_batch=20", f"run.dir={tmp_path}", "run.name=a"]
    res = cli("train", *items)
    assert res.code == 0, res.err
    assert "note: data.batch_size=auto: 40" in res.out
    assert "note: optim.lr_scale=linear: optim.lr 0.001 for a batch of 20 -> 0.002" in res.out
    saved = yaml.safe_load((Path(res.run_dir) / "config.yaml").read_text())
    assert saved["data"]["batch_size"] == 40
    assert saved["optim"]["lr"] == pytest.approx(0.002) and saved["optim"]["lr_batch"] == 40
    # The same command again resumes with the run's batch (no new search) and its LR.
    monkeypatch.setattr(parts_mod, "StepTrial", None)  # a search would fail
    res = cli("train", *items, "train.epochs=2", "run.resume=auto")
    assert res.code == 0, res.err
    assert "resuming from" in res.out and "data.batch_size=auto" not in res.out
    saved = yaml.safe_load((Path(res.run_dir) / "config.yaml").read_text())
    assert saved["data"]["batch_size"] == 40 and saved["optim"]["lr"] == pytest.approx(0.002)
