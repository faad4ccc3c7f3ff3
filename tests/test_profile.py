"""`visiontrain profile`, `vt.profile` and `train.profile_steps` end to end on tiny data."""

from __future__ import annotations

import io
import json
import time

import pytest
import torch
from rich.console import Console

import visiontrain as vt
from conftest import TINY
from visiontrain.config import all_keys, load_config
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.tools.profile_advice import Measurements, advise, list_rules

PHASE_RANGES = {"vt/loader_wait", "vt/h2d", "vt/forward", "vt/backward", "vt/optimizer"}


class _SlowImages(torch.utils.data.Dataset):
    """Two classes of flat 16x16 images; each read sleeps, as a slow disk or decoder."""

    def __init__(self, n: int, delay_s: float) -> None:
        self.n, self.delay_s = n, delay_s

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        time.sleep(self.delay_s)
        return torch.full((3, 16, 16), 40 + 120 * (i % 2), dtype=torch.uint8), i % 2


def test_a_slow_loader_is_the_largest_part_and_the_advice_names_the_loader_keys(tmp_path):
    data = vt.data.from_datasets(
        _SlowImages(64, 0.01), _SlowImages(16, 0.0), classes=["dark", "light"]
    )
    out = io.StringIO()
    result = vt.profile(
        {"data": {"batch_size": 8}, "model": {"width": 4, "depth": 2}},
        "train.progress=none",
        "run.report=false",
        f"run.dir={tmp_path}",
        data=data,
        warmup=1,
        steps=3,
        console=Console(file=out, width=200),
    )
    report = result.report
    phases = {p["name"]: p for p in report["phases"]}
    # 8 reads of 10 ms per batch against a tiny model's few milliseconds of compute.
    assert max(phases.values(), key=lambda p: p["share"])["name"] == "loader_wait"
    assert phases["loader_wait"]["share"] > 0.5
    assert report["window"] == {"from_step": 1, "to_step": 4, "steps": 3}
    loader = next(a for a in result.advice if a["rule"] == "loader_bound")
    assert "data.num_workers" in loader["keys"]
    printed = out.getvalue()
    assert "waiting for the loader" in printed and "loader-bound" in printed
    assert "data.num_workers=auto" in printed
    assert "FLOPs and MFU: measured on CUDA only" in printed
    assert result.folder.parent == tmp_path and result.folder.name.startswith("profile-")


def test_profile_writes_chrome_and_tensorboard_traces_that_parse(cli, tmp_path):
    out = tmp_path / "prof"
    res = cli("profile", *TINY, "train.log_every=1", "--warmup", "1", "--steps", "2", "--out", out)
    assert res.code == 0, res.err
    assert res.run_dir == out
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert PHASE_RANGES | {"vt/logging"} <= names
    boards = list((out / "tb").glob("*.pt.trace.json"))
    assert len(boards) == 1
    assert json.loads(boards[0].read_text())["traceEvents"]
    report = json.loads((out / "profile.json").read_text())
    assert report["window"]["steps"] == 2 and report["step_ms"] > 0
    assert sum(p["share"] for p in report["phases"]) == pytest.approx(1.0, abs=1e-6)
    assert report["top_operators"] and report["samples_per_s"] > 0
    assert (out / "run" / "config.yaml").is_file()
    assert "where a step's time goes" in res.out


def _weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def test_profile_steps_window_of_a_train_run_leaves_its_weights_unchanged(cli, tmp_path):
    exact = [*TINY, "train.deterministic=true", f"run.dir={tmp_path}"]
    plain = cli("train", *exact, "run.name=plain")
    assert plain.code == 0, plain.err
    profiled = cli("train", *exact, "run.name=profiled", "train.profile_steps=1:3")
    assert profiled.code == 0, profiled.err
    folder = tmp_path / "profiled" / "profile"
    report = json.loads((folder / "profile.json").read_text())
    assert report["window"] == {"from_step": 1, "to_step": 3, "steps": 2}
    trace = json.loads((folder / "trace.json").read_text())
    assert {e.get("name") for e in trace["traceEvents"]} >= PHASE_RANGES
    assert len(list((folder / "tb").glob("*.pt.trace.json"))) == 1
    assert "profile (train.profile_steps=1:3)" in profiled.out
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "profiled")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not (tmp_path / "plain" / "profile").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["optim.lrr=0.1"], "did you mean `optim.lr`?"),
        (["--steps", "0"], "--steps 0"),
        (["--warmup", "-1"], "--warmup -1"),
        (["missing.yaml"], "missing.yaml does not exist"),
        (["train.profile_steps=2:5"], "profile takes --warmup and --steps"),
        (["run.resume=auto"], "run.resume=auto has no meaning for profile"),
    ],
)
def test_bad_profile_input_exits_2_naming_the_key(cli, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    # The config file, when given, comes before the overrides.
    res = cli("profile", *args, *TINY, f"run.dir={tmp_path / 'runs'}")
    assert res.code == 2, res.err
    assert expected in res.err and "Traceback" not in res.err
    assert not (tmp_path / "runs").exists()


def test_profile_refuses_an_output_folder_in_use(cli, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine")
    res = cli("profile", *TINY, "--out", tmp_path / "used")
    assert res.code == 2 and "already holds files" in res.err
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3:1", "the first step must come before the last"),
        ("2:2", "the first step must come before the last"),
        ("5", "write two step numbers a:b"),
        ("1:2:3", "write two step numbers a:b"),
        ("-1:3", "non-negative"),
    ],
)
def test_bad_profile_steps_exit_2_before_a_run_folder(cli, tmp_path, value, expected):
    res = cli("train", *TINY, f"run.dir={tmp_path}", f"train.profile_steps={value}")
    assert res.code == 2
    assert "train.profile_steps" in res.err and expected in res.err
    assert list(tmp_path.iterdir()) == []


def test_profile_steps_reads_what_was_written_from_yaml_and_the_command_line(tmp_path):
    # YAML 1.1 reads 1:3 as the base-60 integer 63; the key gets 1:3 back.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  profile_steps: 10:20\n")
    assert load_config(path).train.profile_window() == (10, 20)
    assert load_config(None, ["train.profile_steps=1:3"]).train.profile_window() == (1, 3)
    assert load_config(None, ["train.profile_steps=0:5"]).train.profile_steps == "0:5"
    assert load_config(None, ["train.profile_steps=[4, 8]"]).train.profile_window() == (4, 8)
    assert load_config(None).train.profile_window() is None
    # config.yaml quotes the value, so that a resume reads the same window.
    assert "profile_steps: '1:3'" in load_config(None, ["train.profile_steps=1:3"]).to_yaml()


def test_every_advice_rule_fires_on_its_measurement_and_names_real_keys():
    cfg = load_config(None, ["train.ema=true"])
    phases = ["loader_wait", "h2d", "forward", "backward", "optimizer", "logging", "eval"]
    shares = dict.fromkeys([*phases, "other"], 0.9)
    m = Measurements(
        device="cuda",
        step_ms=100.0,
        ms={k: 90.0 for k in shares},
        shares=shares,
        cfg=cfg,
        cpu_count=8,
        cacheable=True,
        communication_ms=50.0,
        kernels_per_step=1000.0,
        mean_kernel_us=5.0,
        gpu_busy=0.3,
        peak_memory_share=0.95,
    )
    advice = advise(m)
    # compute_bound explains a step the input keeps up with; here the loader does not.
    assert [a.rule for a in advice] == [r for r in list_rules() if r != "compute_bound"]
    fed = advise(Measurements(**{**m.__dict__, "shares": {**shares, "loader_wait": 0.1}}))
    assert "compute_bound" in [a.rule for a in fed]
    keys = set(all_keys())
    for a in [*advice, *fed]:
        assert a.finding and a.fix, a.rule
        assert set(a.keys) <= keys, (a.rule, a.keys)
    by_rule = {a.rule: a for a in advice}
    assert {"train.compile", "train.channels_last"} <= set(by_rule["small_kernels"].keys)
    assert {"train.activation_checkpointing", "train.precision"} <= set(
        by_rule["memory_near_limit"].keys
    )
    assert {"data.num_workers", "data.cache", "data.augment_on"} <= set(
        by_rule["loader_bound"].keys
    )
    # Nothing stands out (and the window stays inside an epoch): no rule fires.
    calm = {**dict.fromkeys(shares, 0.05), "eval": 0.0}
    quiet = Measurements(
        device="cpu", step_ms=10.0, ms=dict.fromkeys(calm, 0.5), shares=calm, cfg=cfg
    )
    assert advise(quiet) == []
