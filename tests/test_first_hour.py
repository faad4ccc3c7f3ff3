"""What a new user meets in the first hour (issue 19): finished runs, unreadable images in
predict, honest messages, the short last batch, file modes."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest
from PIL import Image
from tests.conftest import TINY

from visiontrain.data.loaders import short_batch_rule


@pytest.fixture
def run(cli, tmp_path):
    res = cli("train", *TINY, f"run.dir={tmp_path}", "run.name=r", "train.epochs=2")
    assert res.code == 0, res.err
    return res.run_dir


def test_resuming_a_finished_run_says_so_and_appends_nothing(cli, run, tmp_path):
    metrics = (run / "metrics.jsonl").read_text()
    again = cli("train", *TINY, f"run.dir={tmp_path}", "run.name=r", "train.epochs=2",
                "run.resume=auto")  # fmt: skip
    assert again.code == 0, again.err
    assert "already finished" in again.out and again.run_dir == run
    assert (run / "metrics.jsonl").read_text() == metrics
    more = cli("train", *TINY, f"run.dir={tmp_path}", "run.name=r", "train.epochs=3",
               "run.resume=auto")  # fmt: skip
    assert more.code == 0, more.err
    assert "already finished" not in more.out
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 3


def test_predict_skips_an_unreadable_image_when_asked(cli, run, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    refused = cli("predict", run, good, bad)
    assert refused.code == 2
    assert "--on-error skip" in refused.err and "data.on_error" not in refused.err
    ok = cli("predict", run, good, bad, "--on-error", "skip", "--format", "json")
    assert ok.code == 0, ok.err
    rows = json.loads(ok.out[ok.out.index("[") :])
    assert "prediction" in rows[0] and str(bad) in rows[1]["file"] and rows[1]["error"]
    assert f"skipped {bad}" in ok.err


def test_predict_table_shows_top_k_and_says_how_the_threshold_came(cli, run, tmp_path):
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(image)
    out = cli("predict", run, image, "--top-k", "2")
    assert out.code == 0, out.err
    assert "top" in out.out and "%" in out.out
    threshold = json.loads((run / "summary.json").read_text())["threshold"]
    said = "the fixed default" if threshold["threshold"] == 0.5 else "tuned on val"
    assert said in out.out


def test_missing_or_foreign_checkpoint_messages_fit_the_verb(cli, tmp_path):
    nope = cli("eval", tmp_path / "nope")
    assert nope.code == 2 and "run.resume" not in nope.err and "run directory" in nope.err
    png = tmp_path / "a.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png)
    foreign = cli("eval", png)
    assert foreign.code == 2 and "is not a checkpoint" in foreign.err
    assert "untrusted" not in foreign.err


@pytest.mark.parametrize(
    ("n", "batch", "world", "drop", "says"),
    [
        (96, 16, 1, False, None),  # no remainder
        (60, 32, 1, False, "trains"),  # 28 of 60 would be lost: keep them
        (330, 32, 1, True, "left out"),  # 10 of 330 (3%): drop as asked
        (65, 16, 1, True, "left out"),  # a batch of one cannot train BatchNorm
        (20, 32, 1, False, None),  # a single short batch is the epoch
        (130, 32, 2, True, "per process"),
    ],
)
def test_short_last_batch_rule(n, batch, world, drop, says):
    got, note = short_batch_rule(n, batch, world)
    assert got is drop
    assert (note is None) if says is None else (says in note)


def test_run_files_follow_the_umask(run):
    mask = os.umask(0)
    os.umask(mask)
    want = 0o666 & ~mask
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "checkpoints/last.pt"):
        assert stat.S_IMODE((run / name).stat().st_mode) == want, name


def test_unknown_model_suggests_among_what_serves_the_task(cli):
    res = cli("train", *TINY, "model.name=resnet181", "--check")
    assert res.code == 2 and "did you mean `resnet18`" in res.err
    assert "unet" not in res.err and "fcos" not in res.err
    own = cli("train", *TINY, "model.name=my_unett", "--check")
    assert own.code == 2 and "`unet`" not in own.err


def test_rates_after_a_resume_count_this_process_and_time_continues(tmp_path):
    import signal

    import visiontrain as vt

    class StopAt(vt.Callback):
        name = "stop_at"

        def on_update(self, trainer):
            if trainer.global_step == 5:
                os.kill(os.getpid(), signal.SIGTERM)

    args = [*TINY, f"run.dir={tmp_path}", "run.name=t", "train.log_every=4", "train.epochs=2"]
    with pytest.raises(vt.Interrupted):
        vt.build_trainer(vt.resolve_config(None, args), callbacks=[StopAt()]).fit()
    vt.train(None, *args, "run.resume=auto")
    records = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").open()]
    times = [r["time"] for r in records]
    assert times == sorted(times), times  # the run's clock continued across the resume
    steps = [r for r in records if r["kind"] == "train_step"]
    before = sorted(r["samples_per_s"] for r in steps if r["step"] <= 5)
    first_after = next(r["samples_per_s"] for r in steps if r["step"] > 5)
    # Before the fix the first record after a resume divided the previous process's
    # samples by the new one's seconds (10x too fast and more).
    assert first_after < 4 * before[len(before) // 2]


def test_a_resume_may_change_epochs_and_logging_but_not_the_run(cli, tmp_path):
    args = [*TINY, f"run.dir={tmp_path}", "run.name=c"]
    assert cli("train", *args, "train.epochs=1").code == 0
    wrong = cli("train", *args, "train.epochs=2", "optim.lr=0.5", "data.batch_size=8",
                "run.resume=auto")  # fmt: skip
    assert wrong.code == 2
    assert "optim.lr" in wrong.err and "data.batch_size: 16 in the checkpoint, 8 now" in wrong.err
    ok = cli("train", *args, "train.epochs=2", "train.log_every=2", "run.resume=auto")
    assert ok.code == 0, ok.err
    assert "note: resumed with train.epochs changed: 1 -> 2" in ok.out
    assert "note: resumed with train.log_every changed" in ok.out


def test_fp16_on_the_cpu_says_what_it_costs(cli, tmp_path):
    r = cli("train", *TINY, "train.precision=fp16", f"run.dir={tmp_path}", "run.name=h")
    assert r.code == 0, r.err
    assert "train.precision=fp16 on the CPU" in r.out and "bf16" in r.out


def test_an_epoch_writes_its_state_once_and_the_run_says_its_size(cli, tmp_path):
    res = cli("train", *TINY, f"run.dir={tmp_path}", "run.name=d", "train.epochs=2",
              "run.keep_last=1")  # fmt: skip
    assert res.code == 0, res.err
    folder = res.run_dir / "checkpoints"
    last, epoch = (folder / "last.pt").stat(), (folder / "epoch-0002.pt").stat()
    assert (last.st_ino, last.st_dev) == (epoch.st_ino, epoch.st_dev)  # one file, two names
    assert "MiB on disk" in res.out
    # A later rewrite of last.pt (a resume that trains on) leaves the epoch file alone.
    more = cli("train", *TINY, f"run.dir={tmp_path}", "run.name=d", "train.epochs=3",
               "run.keep_last=2", "run.resume=auto")  # fmt: skip
    assert more.code == 0, more.err
    from visiontrain.engine.checkpoint import load_checkpoint

    assert load_checkpoint(folder / "epoch-0002.pt")["counters"]["epochs_done"] == 2
    assert load_checkpoint(folder / "last.pt")["counters"]["epochs_done"] == 3


def test_config_show_prints_every_key_resolved(cli, run):
    import yaml

    shown = cli("config", "show", "data.batch_size=32")
    assert shown.code == 0, shown.err
    cfg = yaml.safe_load(shown.out)
    assert cfg["data"]["batch_size"] == 32 and cfg["data"]["image_size"] == 48
    assert set(cfg) >= {"task", "data", "model", "loss", "optim", "schedule", "train", "run"}
    # config.yaml of a run holds the size the source resolved, not null.
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["image_size"] == 16


def test_import_makes_a_registered_model_usable_on_every_verb(cli, tmp_path, monkeypatch):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "vt_first_hour_plugin.py").write_text(
        "from torch import nn\n"
        "import visiontrain as vt\n\n"
        "@vt.register_model('first_hour_linear')\n"
        "def build(num_classes, in_chans, **options):\n"
        "    return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "plugins"))
    args = ["--import", "vt_first_hour_plugin"]
    res = cli(*args, "train", *[a for a in TINY if not a.startswith("model.")],
              "model.name=first_hour_linear", f"run.dir={tmp_path}", "run.name=p")  # fmt: skip
    assert res.code == 0, res.err
    ev = cli(*args, "eval", res.run_dir, "--format", "json")
    assert ev.code == 0, ev.err
    bad = cli("--import", "no_such_module_xyz", "eval", res.run_dir)
    assert bad.code == 2 and "--import no_such_module_xyz" in bad.err
