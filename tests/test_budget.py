"""train.min_updates: a recipe's budget in updates holds whatever the data's size."""

from __future__ import annotations

import json

import yaml

from conftest import TINY


def _epochs_run(run):
    return json.loads((run / "summary.json").read_text())["epochs_run"]


def test_min_updates_raises_epochs_for_small_data_and_records_them(cli, tmp_path):
    # 96 images in batches of 16: 6 updates per epoch, so 20 updates need 4 epochs.
    res = cli("train", *TINY, "train.min_updates=20", f"run.dir={tmp_path}", "run.name=s")
    assert res.code == 0, res.err
    assert "train.min_updates=20: 6 updates per epoch, so 4 epochs (24 updates)" in res.out
    assert _epochs_run(res.run_dir) == 4
    assert yaml.safe_load((res.run_dir / "config.yaml").read_text())["train"]["epochs"] == 4
    # Ten times the data: train.epochs already gives the updates, nothing changes.
    res = cli(
        "train", *TINY, "data.train_size=960", "train.min_updates=20", f"run.dir={tmp_path}",
        "run.name=l",
    )  # fmt: skip
    assert res.code == 0, res.err
    assert "already gives 60 updates" in res.out and _epochs_run(res.run_dir) == 1


def test_min_updates_resumes_to_the_same_epochs(cli, tmp_path):
    args = [*TINY, "train.min_updates=20", f"run.dir={tmp_path}", "run.name=r"]
    assert cli("train", *args).code == 0
    res = cli("train", *args, "run.resume=auto")
    assert res.code == 0, res.err
    assert "already finished" in res.out + res.err
