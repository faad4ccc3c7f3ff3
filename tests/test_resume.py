"""Resume: interrupted and continued runs equal uninterrupted ones, bit for bit."""

import json

import torch

from conftest import TINY
from visiontrain.engine.checkpoint import load_checkpoint

# Deterministic, two loader workers, random augmentation on, dropout on: every source of
# randomness a resume has to repeat.
EXACT = [
    *TINY,
    "train.deterministic=true",
    "data.num_workers=2",
    "data.augment=standard",
    "model.dropout=0.2",
    "schedule.name=step",
    "schedule.step_size=1",
    "schedule.gamma=0.7",
    "train.log_every=2",
]


def _metrics(run_dir):
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "calibrated":
            # The threshold tuned on val when a run finishes (train.threshold=auto): a run
            # stopped after 2 epochs and resumed to 4 tuned one more time than a 4-epoch run.
            continue
        out.append(
            {
                k: r.get(k)
                for k in (
                    "step",
                    "epoch",
                    "split",
                    "kind",
                    "loss",
                    "lr",
                    "grad_norm",
                    "accuracy",
                    "macro_f1",
                )
            }
        )
    return out


def _weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_epochs_resumed_to_four_equal_four_in_one_go(cli, tmp_path):
    full = cli("train", *EXACT, "train.epochs=4", f"run.dir={tmp_path}", "run.name=full")
    assert full.code == 0, full.err
    half = cli("train", *EXACT, "train.epochs=2", f"run.dir={tmp_path}", "run.name=half")
    assert half.code == 0, half.err
    resumed = cli(
        "train", *EXACT, "train.epochs=4", f"run.dir={tmp_path}", "run.name=half", "run.resume=auto"
    )
    assert resumed.code == 0, resumed.err
    assert "resuming from" in resumed.out
    assert_same_weights(_weights(tmp_path / "full"), _weights(tmp_path / "half"))
    # The test split is evaluated once per finished run; compare everything up to it.
    full_m = [m for m in _metrics(tmp_path / "full") if m["split"] != "test"]
    half_m = [m for m in _metrics(tmp_path / "half") if m["split"] != "test"]
    assert full_m == half_m
    summary_full = json.loads((tmp_path / "full" / "summary.json").read_text())
    summary_half = json.loads((tmp_path / "half" / "summary.json").read_text())
    assert summary_full["metrics"] == summary_half["metrics"]


def test_resume_from_an_explicit_path_and_auto_without_checkpoint(cli, tmp_path):
    first = cli("train", *TINY, f"run.dir={tmp_path}", "run.name=p")
    assert first.code == 0
    ckpt = tmp_path / "p" / "checkpoints" / "last.pt"
    res = cli("train", *TINY, "train.epochs=2", f"run.dir={tmp_path}", f"run.resume={ckpt}")
    assert res.code == 0, res.err
    assert res.run_dir == tmp_path / "p"
    assert load_checkpoint(ckpt)["counters"]["epochs_done"] == 2
    # auto with no checkpoint yet starts fresh
    res = cli("train", *TINY, f"run.dir={tmp_path}", "run.name=new", "run.resume=auto")
    assert res.code == 0 and "resuming" not in res.out


def test_resume_with_another_architecture_is_refused(cli, tmp_path):
    assert cli("train", *TINY, f"run.dir={tmp_path}", "run.name=r").code == 0
    res = cli(
        "train",
        *TINY,
        "model.width=8",
        "train.epochs=2",
        f"run.dir={tmp_path}",
        "run.name=r",
        "run.resume=auto",
    )
    assert res.code == 2
    # The checkpoint fixes the architecture: the key is named with both values.
    assert "model.width: 4 in the checkpoint, 8 now" in res.err and "last.pt" in res.err
