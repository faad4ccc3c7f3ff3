"""Fine-tuning: weights from disk in every format, head re-initialisation, transfer LRs,
freezing (exact across the unfreeze and a SIGTERM), backbone weights for dense models."""

from __future__ import annotations

import json
import os
import pickle
import signal

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY, run_subprocess
from test_distributed import ddp_train
from test_resume import EXACT, assert_same_weights
from test_signals import _start, _wait_for
from visiontrain.config import build_config
from visiontrain.engine.checkpoint import load_checkpoint
from visiontrain.engine.optim import build_optimizer
from visiontrain.engine.weights import read_weights
from visiontrain.errors import ConfigError
from visiontrain.models import create_model
from visiontrain.models.weights import load_backbone_weights, load_weights

# Four classes (ok, scratch, spot, crack) from a two-class source: the head must change.
TYPES = ["data.defect_classes=types", "data.defect_rate=0.4"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained two-class simple_cnn run (width 4, depth 2)."""
    from visiontrain.cli import main

    runs = tmp_path_factory.mktemp("src")
    assert main(["train", *TINY, f"run.dir={runs}", "run.name=src"]) == 0
    return runs / "src"


def _summary(run):
    return json.loads((run / "summary.json").read_text())


def _best(run):
    return load_checkpoint(run / "checkpoints" / "best.pt")


def _body_equal(a, b, head="head."):
    """Every parameter outside the head equal (BatchNorm statistics move in train mode)."""
    for key in a:
        if not key.startswith(head) and "running_" not in key and "num_batches" not in key:
            assert torch.equal(a[key], b[key]), key


def test_run_directory_loads_and_head_is_reinitialised(cli, source, tmp_path):
    res = cli("train", *TINY, *TYPES, f"model.weights={source}", f"run.dir={tmp_path}")
    assert res.code == 0, res.err
    assert "note: model.weights: visiontrain checkpoint" in res.out
    assert "re-initialised head head" in res.out and "(2, 8) -> (4, 8)" in res.out
    info = _summary(res.run_dir)["weights"][0]
    assert info["reinitialised"] == {
        "head.weight": {"file": [2, 8], "model": [4, 8]},
        "head.bias": {"file": [2], "model": [4]},
    }
    assert info["loaded"]["count"] == len(_best(source)["model"]) - 2
    # The source's body is where training started: an epoch at a tiny LR barely moves it.
    res = cli(
        "train", *TINY, *TYPES, f"model.weights={source}", "optim.lr=1e-9",
        "model.freeze=[features]", f"run.dir={tmp_path}", "run.name=frozen",
    )  # fmt: skip
    assert res.code == 0, res.err
    _body_equal(
        _best(source)["model"], load_checkpoint(res.run_dir / "checkpoints/last.pt")["model"]
    )


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "nested"])
def test_state_dict_files_load(cli, source, tmp_path, fmt):
    weights = _best(source)["model"]
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    elif fmt == "nested":  # a training checkpoint of another tool, DDP-prefixed
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in weights.items()}}, path)
    else:
        torch.save(weights, path)
    res = cli("train", *TINY, f"model.weights={path}", "optim.lr=1e-9", f"run.dir={tmp_path}")
    assert res.code == 0, res.err
    info = _summary(res.run_dir)["weights"][0]
    assert info["loaded"]["count"] == len(weights) and not info["reinitialised"]
    assert info["missing"]["count"] == 0 and info["unexpected"]["count"] == 0
    # Same classes: the head loads too, so the first evaluation is the source's own.
    loaded = load_checkpoint(res.run_dir / "checkpoints/best.pt")["model"]
    assert torch.allclose(loaded["head.weight"], weights["head.weight"], atol=1e-6)


def test_body_mismatch_is_exit_2_naming_the_keys(cli, source, tmp_path):
    res = cli(
        "train", *TINY, "model.width=8", f"model.weights={source}", f"run.dir={tmp_path}",
        "run.name=x",
    )  # fmt: skip
    assert res.code == 2
    assert "features.0.weight (4, 1, 3, 3) in the file, (8, 1, 3, 3) here" in res.err
    assert "model.name" in res.err and "Traceback" not in res.err
    assert not (tmp_path / "x").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_carrying_pickle_is_refused_and_never_runs(cli, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv.weight": torch.zeros(1), "x": _Payload(marker)}, path)
    res = cli("train", *TINY, f"model.weights={path}", f"run.dir={tmp_path}")
    assert res.code == 2 and "refused" in res.err and str(path) in res.err
    assert not marker.exists()
    with open(path, "wb") as fh:  # a legacy plain pickle too
        pickle.dump({"x": _Payload(marker)}, fh)
    assert cli("train", *TINY, f"model.weights={path}", f"run.dir={tmp_path}").code == 2
    assert not marker.exists()


def test_truncated_safetensors_and_missing_file_are_exit_2(cli, source, tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in _best(source)["model"].items()}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    res = cli("train", *TINY, f"model.weights={path}", f"run.dir={tmp_path}")
    assert res.code == 2 and "truncated or not a safetensors file" in res.err
    res = cli("train", *TINY, f"model.weights={tmp_path / 'nope.pt'}", f"run.dir={tmp_path}")
    assert res.code == 2 and "nope.pt" in res.err


TV_TINY = [*TINY, "model.width=null", "model.depth=null", "data.image_size=32"]


def test_pretrained_reads_torchvision_cache_without_network(cli, tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_network(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    cached = tmp_path / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[-1]
    args = [*TV_TINY, "model.name=torchvision:resnet18", "model.pretrained=true"]
    res = cli("train", *args, f"run.dir={tmp_path}", "run.name=missing")
    assert res.code == 2 and str(cached) in res.err and url in res.err
    assert not (tmp_path / "missing").exists()
    # A generated ImageNet-shaped state dict under torchvision's own file name.
    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18(num_classes=1000).state_dict()
    cached.parent.mkdir(parents=True, exist_ok=True)
    torch.save(imagenet, cached)
    res = cli("train", *args, "optim.lr=1e-9", f"run.dir={tmp_path}", "run.name=ok")
    assert res.code == 0, res.err
    assert f"model.pretrained: state dict (.pth) {cached}" in res.out
    info = _summary(res.run_dir)["weights"][0]
    assert info["reinitialised"]["model.fc.weight"] == {"file": [1000, 512], "model": [2, 512]}
    assert info["renamed"] == "`(none)` -> `model.`"  # the grey-to-RGB wrapper's prefix
    # torchvision models take 3 channels: the grey image is repeated, the conv kept.
    got = load_checkpoint(res.run_dir / "checkpoints/last.pt")["model"]
    assert torch.allclose(got["model.layer4.1.conv2.weight"], imagenet["layer4.1.conv2.weight"])


def test_timm_file_goes_through_timm_loading(tmp_path):
    """A timm-saved state dict: classifier dropped for 4 classes, 3 -> 1 channels summed."""
    import timm

    src = timm.create_model("resnet10t", num_classes=10)
    torch.save(src.state_dict(), tmp_path / "r.pth")
    dst = timm.create_model("resnet10t", num_classes=4, in_chans=1)
    report = load_weights(dst, read_weights(tmp_path / "r.pth"))
    assert set(report.reinitialised) == {"fc.weight", "fc.bias"}
    assert set(report.adapted) == {"conv1.0.weight"}
    want = src.state_dict()
    assert torch.allclose(dst.conv1[0].weight, want["conv1.0.weight"].sum(1, keepdim=True))
    assert torch.equal(dst.layer4[0].conv1.weight, want["layer4.0.conv1.weight"])


def _groups(overrides, model):
    cfg = build_config(overrides=overrides)
    return {g["name"]: g for g in build_optimizer(cfg.optim, model).param_groups}


def test_backbone_lr_factor_groups():
    model = create_model("resnet10t", num_classes=3, in_chans=3)
    groups = _groups(["optim.lr=0.01", "optim.backbone_lr_factor=0.1"], model)
    assert {n: g["lr"] for n, g in groups.items()} == pytest.approx(
        {
            "head_decay": 0.01,
            "head_no_decay": 0.01,
            "backbone_decay": 1e-3,
            "backbone_no_decay": 1e-3,
        }
    )
    head = {id(p) for p in model.fc.parameters()}
    assert {id(p) for n in ("head_decay", "head_no_decay") for p in groups[n]["params"]} == head
    assert groups["backbone_no_decay"]["weight_decay"] == 0.0
    assert next(iter(groups)).startswith("head")  # the LR test reads the head's LR as the run's


def test_layer_decay_matches_timm_grouping():
    from timm.optim import param_groups_layer_decay

    model = create_model("resnet10t", num_classes=3, in_chans=3)
    ours = _groups(["optim.lr=0.01", "optim.layer_decay=0.7"], model)
    lr_of = {id(p): g["lr"] for g in ours.values() for p in g["params"]}
    theirs = param_groups_layer_decay(model, weight_decay=0.01, layer_decay=0.7)
    checked = 0
    for group in theirs:
        for p in group["params"]:
            assert lr_of[id(p)] == pytest.approx(0.01 * group["lr_scale"])
            checked += 1
    assert checked == sum(1 for _ in model.parameters())
    assert len({round(lr, 12) for lr in lr_of.values()}) > 3


def test_layer_decay_is_refused_without_timm_grouping():
    model = create_model("simple_cnn", num_classes=3, in_chans=1)
    with pytest.raises(ConfigError, match="group_matcher"):
        _groups(["optim.layer_decay=0.7"], model)


def test_freeze_epochs_trains_the_head_alone_then_everything(cli, source, tmp_path):
    res = cli(
        "train", *TINY, *TYPES, f"model.weights={source}", "train.freeze_epochs=1",
        "train.epochs=2", "run.keep_last=2", "train.progress=plain", f"run.dir={tmp_path}",
    )  # fmt: skip
    assert res.code == 0, res.err
    assert "only the head trains" in res.out and "every layer trains from here" in res.out
    src = _best(source)["model"]
    first = load_checkpoint(res.run_dir / "checkpoints/epoch-0001.pt")
    _body_equal(src, first["model"])
    # No gradient, no optimizer state: only the head's two tensors have AdamW moments.
    assert len(first["optimizer"]["state"]) == 2
    second = load_checkpoint(res.run_dir / "checkpoints/epoch-0002.pt")
    assert not torch.equal(second["model"]["features.0.weight"], src["features.0.weight"])
    assert len(second["optimizer"]["state"]) == len(
        [k for k in src if "running" not in k and "num_batches" not in k]
    )


def test_sigterm_in_the_frozen_phase_resumes_bit_identical(tmp_path, source):
    args = [
        *EXACT, *TYPES, f"model.weights={source}", "data.train_size=320", "train.epochs=3",
        "train.freeze_epochs=2", "train.log_every=1", "schedule.name=warmup_cosine",
        "schedule.step_size=null", "schedule.gamma=null", f"run.dir={tmp_path}",
    ]  # fmt: skip
    proc = _start(*args, "run.name=t")
    _wait_for(tmp_path / "t" / "metrics.jsonl", proc, min_lines=8)  # inside epoch 1 of 2 frozen
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    state = load_checkpoint(tmp_path / "t" / "checkpoints" / "last.pt")
    assert state["counters"]["epochs_done"] < 2
    done = run_subprocess("train", *args, "run.name=t", "run.resume=auto")
    assert done.returncode == 0, done.stderr
    ref = run_subprocess("train", *args, "run.name=ref")
    assert ref.returncode == 0, ref.stderr
    a = load_checkpoint(tmp_path / "t" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")
    assert_same_weights(a["model"], b["model"])
    assert a["weights"] == b["weights"] and a["weights"][0]["key"] == "model.weights"


def test_freeze_bn_and_freeze_prefixes(cli, source, tmp_path):
    res = cli(
        "train", *TINY, f"model.weights={source}", "model.freeze_bn=true",
        "model.freeze=[features.0]", f"run.dir={tmp_path}",
    )  # fmt: skip
    assert res.code == 0, res.err
    assert "model.freeze: features.0 never train" in res.out
    src, got = _best(source)["model"], load_checkpoint(res.run_dir / "checkpoints/last.pt")
    for key in ("features.1.weight", "features.1.running_mean", "features.0.weight"):
        assert torch.equal(got["model"][key], src[key]), key
    assert "features.1.num_batches_tracked" not in got["model"]  # FrozenBatchNorm2d
    assert cli("eval", res.run_dir).code == 0
    res = cli("train", *TINY, "model.freeze=[nope]", f"run.dir={tmp_path}")
    assert res.code == 2 and "model.freeze: nope names no module" in res.err


def test_backbone_weights_into_a_detector_and_a_unet(tmp_path):
    import timm

    cls = create_model("tinynet", num_classes=5, in_chans=3)
    torch.save(cls.state_dict(), tmp_path / "tiny.pth")
    det = create_model(
        "fasterrcnn_tiny", num_classes=3, in_chans=3, task="detection", image_size=64
    )
    report = load_backbone_weights(det, read_weights(tmp_path / "tiny.pth"))
    assert report.into == "backbone `backbone`"
    assert report.loaded and all(k.startswith(("stem", "c3", "c4", "c5")) for k in report.loaded)
    assert report.unexpected == ["head.weight", "head.bias"]
    assert all(k.startswith("fpn.") for k in report.missing)
    assert torch.equal(det.backbone.c5[3].weight, cls.c5[3].weight)

    enc = timm.create_model("resnet18", num_classes=7)
    torch.save(enc.state_dict(), tmp_path / "r18.pth")
    unet = create_model(
        "unet", num_classes=3, in_chans=3, task="segmentation", image_size=64, encoder="resnet18"
    )
    report = load_backbone_weights(unet, read_weights(tmp_path / "r18.pth"))
    assert report.into == "backbone `encoder`"
    assert report.unexpected == ["fc.weight", "fc.bias"] and not report.missing
    assert torch.equal(unet.encoder.layer3[1].conv2.weight, enc.layer3[1].conv2.weight)


def test_backbone_weights_from_the_cli_into_fasterrcnn_tiny(cli, tmp_path):
    cls = create_model("tinynet", num_classes=5, in_chans=3, width=8)
    torch.save(cls.state_dict(), tmp_path / "tiny.pth")
    res = cli(
        "train", "task=detection", "data.name=shapes", "model.name=fasterrcnn_tiny",
        "model.width=8", "data.image_size=64", "data.train_size=8", "data.val_size=4",
        "data.test_size=4", "data.batch_size=4", "train.epochs=1", "train.progress=none",
        "run.report=false", f"model.backbone_weights={tmp_path / 'tiny.pth'}",
        f"run.dir={tmp_path}",
    )  # fmt: skip
    assert res.code == 0, res.err
    assert "model.backbone_weights: state dict (.pth)" in res.out and "into backbone" in res.out
    res = cli("train", *TINY, f"model.backbone_weights={tmp_path / 'tiny.pth'}")
    assert res.code == 2 and "detectors and segmenters" in res.err


def test_freeze_epochs_under_ddp(tmp_path, source):
    code, out = ddp_train(
        tmp_path, "ddp", *TYPES, f"model.weights={source}", "train.freeze_epochs=1",
        "train.epochs=2",
    )  # fmt: skip
    assert code == 0, out
    assert "every layer trains from here" in out
    state = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.pt")
    assert not torch.equal(
        state["model"]["features.0.weight"], _best(source)["model"]["features.0.weight"]
    )


def test_shipped_recipe_fine_tunes_a_folder_from_a_timm_file(cli, tmp_path):
    """configs/finetune.yaml as its header says, starting from a timm-saved file."""
    import timm

    from test_data import make_folder

    make_folder(tmp_path / "imgs", "train", {"a": 12, "b": 12})
    src = timm.create_model("resnet10t", num_classes=10)
    torch.save(src.state_dict(), tmp_path / "r.pth")
    res = cli(
        "train", "configs/finetune.yaml", f"data.root={tmp_path / 'imgs'}", "model.name=resnet10t",
        "model.pretrained=false", f"model.weights={tmp_path / 'r.pth'}", "data.image_size=32",
        "data.batch_size=8", "data.num_workers=0", "train.epochs=2", "train.min_updates=null",
        "train.progress=plain",
        "run.report=false", f"run.dir={tmp_path}",
    )  # fmt: skip
    assert res.code == 0, res.err
    assert "re-initialised head fc" in res.out and "only the head trains" in res.out
    lrs = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    groups = next(r["lr_groups"] for r in lrs if "lr_groups" in r)
    assert groups["head_decay"] == pytest.approx(10 * groups["backbone_decay"])


def test_pretrained_timm_reads_the_hugging_face_cache_offline(cli, tmp_path, monkeypatch):
    import timm
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    repo = timm.models.get_pretrained_cfg("resnet10t").hf_hub_id  # timm/resnet10t.c3_in1k
    args = [*TV_TINY, "model.name=resnet10t", "model.pretrained=true", f"run.dir={tmp_path}"]
    res = cli("train", *args, "run.name=missing")
    assert res.code == 2 and "HF_HUB_OFFLINE" in res.err
    err = "".join(res.err.split())  # the message is folded to the terminal's width
    assert f"models--{repo.replace('/', '--')}/snapshots/<revision>/model.safetensors" in err
    # Hugging Face's cache layout: refs/main names the snapshot holding the file.
    folder = tmp_path / "hf" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    imagenet = timm.create_model("resnet10t", num_classes=1000).state_dict()
    save_file(imagenet, str(folder / "snapshots" / "abc123" / "model.safetensors"))
    res = cli("train", *args, "optim.lr=1e-9", "run.name=ok")
    assert res.code == 0, res.err
    assert "model.pretrained: safetensors file" in res.out and "re-initialised head fc" in res.out
    got = load_checkpoint(res.run_dir / "checkpoints/last.pt")["model"]
    assert torch.allclose(got["conv1.0.weight"], imagenet["conv1.0.weight"].sum(1, keepdim=True))


def test_a_safetensors_export_seeds_another_run(cli, source, tmp_path):
    out = tmp_path / "export"
    res = cli("export", source, "--format", "safetensors", "--out", out)
    assert res.code == 0, res.err
    for target in (out / "model.safetensors", out):  # the file or its export folder
        res = cli("train", *TINY, *TYPES, f"model.weights={target}", f"run.dir={tmp_path}")
        assert res.code == 0, res.err
        assert "model.weights: safetensors file" in res.out and "re-initialised head" in res.out
