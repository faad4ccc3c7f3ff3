"""Every tool that trains or evaluates runs the one step (engine/step.py) and the one
evaluation loop (engine/evaluate.py), so each honours channels_last, device augmentation,
accumulation and clipping the way training does; and no import cycle spans two areas."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from rich.console import Console
from tests.conftest import TINY

from visiontrain.config import load_config
from visiontrain.engine.step import BatchPrep, Step

OPTIONS = [
    "train.channels_last=true",
    "data.augment_on=device",
    "train.accumulate=2",
    "train.grad_clip_norm=0.5",
]


@pytest.fixture
def spy(monkeypatch):
    """Records each prepared batch's layout and augmentation, and each update's group."""
    seen = {"prep": [], "updates": [], "micro": 0}
    prep_call, fb, update = BatchPrep.__call__, Step.forward_backward, Step.update

    def spy_prep(self, images, augment=False, epoch=0, batch=0):
        x = prep_call(self, images, augment, epoch, batch)
        augmented = augment and self.device_augment is not None
        seen["prep"].append((x.is_contiguous(memory_format=torch.channels_last), augmented))
        return x

    def spy_fb(self, *args, **kwargs):
        seen["micro"] += 1
        return fb(self, *args, **kwargs)

    def spy_update(self, *args, **kwargs):
        seen["updates"].append((seen["micro"], self.grad_clip_norm))
        seen["micro"] = 0
        return update(self, *args, **kwargs)

    monkeypatch.setattr(BatchPrep, "__call__", spy_prep)
    monkeypatch.setattr(Step, "forward_backward", spy_fb)
    monkeypatch.setattr(Step, "update", spy_update)
    return seen


def _assert_trains_like_training(seen, updates_at_least=1):
    assert seen["prep"], "no batch went through BatchPrep"
    assert all(layout for layout, _ in seen["prep"]), "a batch skipped channels_last"
    assert any(aug for _, aug in seen["prep"]), "no training batch was device-augmented"
    groups = [n for n, _ in seen["updates"]]
    assert len(groups) >= updates_at_least
    assert all(n == 2 for n in groups), groups  # train.accumulate=2 micro-batches each
    assert all(clip == 0.5 for _, clip in seen["updates"])


def test_trainer_lr_find_and_bench_use_the_step(spy, cli, tmp_path):
    from visiontrain.tools.lr_find import find_lr

    cfg = load_config(None, [*TINY, *OPTIONS, f"run.dir={tmp_path}"])
    find_lr(cfg, Console(quiet=True), steps=6)
    _assert_trains_like_training(spy, 6)
    spy["prep"].clear(), spy["updates"].clear()
    r = cli("bench", "amp", *TINY, *OPTIONS, f"run.dir={tmp_path}", "run.name=b", "--steps", "2")
    assert r.code == 0, r.err
    _assert_trains_like_training(spy, 2)
    spy["prep"].clear(), spy["updates"].clear()
    r = cli("train", *TINY, *OPTIONS, f"run.dir={tmp_path}", "run.name=t")
    assert r.code == 0, r.err
    _assert_trains_like_training(spy, 2)
    # eval, and the report's sample grid, prepare batches as training evaluates them.
    spy["prep"].clear()
    r = cli("eval", tmp_path / "t", "--format", "json")
    assert r.code == 0, r.err
    assert spy["prep"] and all(layout and not aug for layout, aug in spy["prep"])
    spy["prep"].clear()
    r = cli("report", tmp_path / "t")
    assert r.code == 0, r.err
    assert spy["prep"] and all(layout for layout, _ in spy["prep"])


def test_doctor_checks_use_the_step_and_the_eval_loop(spy, tmp_path):
    from visiontrain.tools import doctor

    cfg = load_config(None, [*TINY, *OPTIONS, f"run.dir={tmp_path}"])
    checks = ["train.gradients", "data.loader_speed", "eval.mode"]
    findings = doctor.run_doctor(cfg, Console(quiet=True), checks)
    assert {f.name for f in findings} >= set(checks)
    assert not [f for f in findings if f.level == "error"], findings
    _assert_trains_like_training(spy, 2)


# ----------------------------------------------------------------------------- imports

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "visiontrain"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in (SRC / PACKAGE).rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def _import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the package modules it imports, counting imports inside functions."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = defaultdict(set)
    for mod, path in mods.items():
        base = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    b = base
                    for _ in range(node.level - 1):
                        b = b.rpartition(".")[0]
                    name = f"{b}.{node.module}" if node.module else b
                else:
                    name = node.module or ""
                targets = [name, *(f"{name}.{a.name}" for a in node.names)]
            else:
                continue
            for t in targets:
                r = resolve(t) if t.split(".")[0] == PACKAGE else None
                if r and r != mod:
                    edges[mod].add(r)
    return edges


def _cycles(edges: dict[str, set[str]], nodes: list[str]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return out


def _area(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_import_cycle_spans_two_areas():
    mods = _modules()
    cycles = _cycles(_import_graph(mods), sorted(mods))
    across = [c for c in cycles if len({_area(m) for m in c}) > 1]
    assert not across, across


def test_the_cycle_check_finds_a_planted_cycle():
    edges = defaultdict(set, {"visiontrain.engine.a": {"visiontrain.report.b"},
                              "visiontrain.report.b": {"visiontrain.engine.a"}})  # fmt: skip
    cycles = _cycles(edges, sorted(edges))
    assert cycles == [["visiontrain.engine.a", "visiontrain.report.b"]]


def test_engine_imports_nothing_above_it():
    """engine/ holds the loop: it knows no tool, report, tracker, exporter or the API."""
    above = {"api", "cli", "tools", "export", "predict", "report", "tracking"}
    edges = _import_graph(_modules())
    bad = {
        (m, t)
        for m, targets in edges.items()
        if _area(m) == "engine"
        for t in targets
        if _area(t) in above
    }
    assert not bad, bad
