"""Hostile and broken input, one test per item of the reliability issue's list.

Every case ends in exit 2 with a one-paragraph message that names the file (or key) and
the fix, and no traceback — or, where the issue asks for it, in a ``skip`` under
``data.on_error=skip`` or a correct conversion. The cases run the real CLI in-process
(``cli`` fixture), with the tiny settings of ``conftest.TINY``.

Sections: checkpoints, configs, images, annotations, then two properties: random config
overrides (hypothesis) and a fuzz over corrupted image bytes (in a child process, so a
crash or hang of a native decoder fails the test instead of killing the runner).
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import TINY, TINY_ANY
from visiontrain.cli import main
from visiontrain.config import Config, all_keys, load_config
from visiontrain.data.imagefolder import _image_files
from visiontrain.data.images import MAX_PIXELS, decode_file
from visiontrain.errors import ConfigError, DataError


def refused(res, *needles: str) -> str:
    """Assert exit 2 with one error paragraph holding every needle; return the message."""
    assert res.code == 2, (res.code, res.err)
    assert "Traceback" not in res.err
    assert "error: " in res.err, res.err
    message = res.err[res.err.index("error: ") :].strip()
    assert "\n" not in message, message  # one paragraph
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# ------------------------------------------------------------------------ checkpoints


class _Payload:
    """Unpickling this runs ``touch marker``: the classic code-execution payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("ckpt")
    assert main(["train", *TINY, f"run.dir={runs}", "run.name=good"]) == 0
    return runs / "good" / "checkpoints" / "last.pt"


def _run_copy(good_ckpt: Path, tmp_path: Path) -> Path:
    """A copy of the trained run; returns its last.pt."""
    run = tmp_path / "runs" / "good"
    shutil.copytree(good_ckpt.parent.parent, run)
    return run / "checkpoints" / "last.pt"


@pytest.mark.parametrize("writer", ["pickle", "torch_save"])
def test_checkpoint_with_code_execution_payload(cli, tmp_path, writer):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.pt"
    with open(ckpt, "wb") as fh:
        state = {"format": "visiontrain-checkpoint", "model": _Payload(marker)}
        pickle.dump(state, fh) if writer == "pickle" else torch.save(state, fh)
    refused(cli("eval", ckpt), str(ckpt), "refused", "untrusted")
    assert not marker.exists()


def test_truncated_checkpoint(cli, tmp_path, good_ckpt):
    ckpt = _run_copy(good_ckpt, tmp_path)
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    refused(cli("eval", ckpt), str(ckpt), "truncated", "another checkpoint")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ("model.width=8", "model.width: 4 in the checkpoint, 8 now"),  # another architecture
        ("task=regression", "task: 'classification' in the checkpoint"),  # another task
    ],
)
def test_checkpoint_from_another_task_or_architecture(cli, tmp_path, good_ckpt, change, needle):
    ckpt = _run_copy(good_ckpt, tmp_path)
    res = cli(
        "train",
        *TINY,
        change,
        "train.epochs=2",
        f"run.dir={tmp_path / 'runs'}",
        "run.name=good",
        "run.resume=auto",
    )
    refused(res, needle)
    assert ckpt.exists()


def test_checkpoint_hash_mismatch(cli, tmp_path, good_ckpt):
    ckpt = _run_copy(good_ckpt, tmp_path)
    state = torch.load(ckpt, weights_only=True)
    first = next(iter(state["model"]))
    state["model"][first] = state["model"][first] + 1  # a silent edit of the weights
    torch.save(state, ckpt)
    refused(cli("eval", ckpt), str(ckpt), "fails its content hash", "another checkpoint")


# ---------------------------------------------------------------------------- configs


@pytest.mark.parametrize("where", ["file", "override"])
def test_config_yaml_with_python_object_tag(cli, tmp_path, where):
    marker = tmp_path / "pwned"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    if where == "file":
        cfg = tmp_path / "evil.yaml"
        cfg.write_text(f"optim:\n  lr: {tag}\n")
        message = refused(cli("train", cfg, *TINY), str(cfg), "object tags")
    else:
        message = refused(cli("train", *TINY, f"optim.lr={tag}"), "`optim.lr`")
    assert "Traceback" not in message and not marker.exists()


def test_config_unknown_key(cli, tmp_path):
    res = cli("train", *TINY, "data.batchsize=8", f"run.dir={tmp_path}")
    refused(res, "unknown key `data.batchsize`", "did you mean `data.batch_size`")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epochs=many", "`train.epochs`"),
        ("data.batch_size=[16]", "`data.batch_size`"),
        ("model.pretrained=maybe", "`model.pretrained`"),
        ("optim=0.1", "`optim`"),
        ("optim.lr.value=1", "`optim.lr`"),
    ],
)
def test_config_wrong_types(cli, tmp_path, override, key):
    refused(cli("train", *TINY, override, f"run.dir={tmp_path}"), key)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epochs=-1", "`train.epochs` = -1"),
        ("optim.lr=0", "`optim.lr` = 0"),
        ("optim.lr=-3e-4", "`optim.lr`"),
        ("data.batch_size=0", "`data.batch_size` = 0"),
        ("data.image_size=1000000", "`data.image_size` = 1000000"),
        ("optim.lr=.nan", "`optim.lr`"),
        ("train.grad_clip_norm=.inf", "`train.grad_clip_norm`"),
        ("schedule.warmup_epochs=.inf", "`schedule.warmup_epochs`"),
        ("optim.betas=[2,3]", "`optim.betas`"),
        ("data.split_seed=-1", "`data.split_seed`"),
        ("run.name=../../elsewhere", "`run.name`"),
    ],
)
def test_config_absurd_values(cli, tmp_path, override, key):
    refused(cli("train", *TINY, override, f"run.dir={tmp_path / 'runs'}"), key)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "elsewhere").exists()


# ----------------------------------------------------------------------------- images


def _rgb(seed: int, h: int = 20, w: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _folder(root: Path, n: int = 6) -> Path:
    for c, cls in enumerate(("cat", "dog")):
        (root / "train" / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_rgb(10 * c + i)).save(root / "train" / cls / f"{i}.png")
    return root


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(path: Path, side: int = 20_000) -> Path:
    """A valid PNG of a few hundred bytes that declares side x side grey pixels."""
    rows = zlib.compress(b"\x00" * (side + 1) * 8, 9)  # a few rows; the rest is missing
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def jpeg_bomb(path: Path) -> Path:
    """A small JPEG whose frame header is patched to declare 60000 x 60000 pixels."""
    buf = path.with_suffix(".tmp")
    Image.fromarray(_rgb(3)).save(buf, format="JPEG")
    data = bytearray(buf.read_bytes())
    buf.unlink()
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)
    path.write_bytes(bytes(data))
    return path


def _bad_image(kind: str, folder: Path) -> Path:
    """Write one refused kind of image file into ``folder``; returns its path."""
    if kind == "zero_byte":
        path = folder / "zero.png"
        path.write_bytes(b"")
    elif kind == "truncated_jpeg":
        path = folder / "truncated.jpg"
        Image.fromarray(_rgb(5, 64, 64)).save(path, quality=90)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "png_decompression_bomb":
        path = png_bomb(folder / "bomb.png")
    elif kind == "jpeg_decompression_bomb":
        path = jpeg_bomb(folder / "bomb.jpg")
    elif kind == "symlink_loop":
        path = folder / "loop.png"
        path.symlink_to(path.name)
    else:
        raise AssertionError(kind)
    return path


REFUSED = [
    "zero_byte",
    "truncated_jpeg",
    "png_decompression_bomb",
    "jpeg_decompression_bomb",
    "symlink_loop",
]


def _train_folder(cli, root: Path, tmp_path: Path, *extra: str):
    return cli(
        "train",
        *TINY_ANY,
        "data.name=imagefolder",
        f"data.root={root}",
        "data.val_split=0.3",
        f"run.dir={tmp_path / 'runs'}",
        *extra,
    )


@pytest.mark.parametrize("kind", REFUSED)
def test_refused_image_exits_2_naming_the_file(cli, tmp_path, kind):
    root = _folder(tmp_path / "data")
    bad = _bad_image(kind, root / "train" / "dog")
    refused(_train_folder(cli, root, tmp_path), str(bad), "data.on_error=skip")
    assert not list((tmp_path / "runs").rglob("summary.json"))


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1000 and MAX_PIXELS < 20_000**2
    # Not one pixel buffer may be allocated: the decoders must never be reached.
    import visiontrain.data.images as images

    def no_decode(*args, **kwargs):
        raise AssertionError("a decoder ran on a decompression bomb")

    monkeypatch.setattr(images, "decode_image", no_decode)
    monkeypatch.setattr(images, "_decode_pil", no_decode)
    for path in (bomb, jpeg_bomb(tmp_path / "bomb.jpg")):
        with pytest.raises(DataError, match=r"above the limit") as err:
            decode_file(path)
        assert str(path) in str(err.value) and "Downscale" in str(err.value)


def test_refused_images_are_skipped_under_on_error_skip(cli, tmp_path):
    root = _folder(tmp_path / "data")
    bad = sorted(str(_bad_image(kind, root / "train" / "dog")) for kind in REFUSED)
    res = _train_folder(cli, root, tmp_path, "data.on_error=skip")
    assert res.code == 0, res.err
    summary = json.loads((res.run_dir / "summary.json").read_text())
    assert sorted(summary["skipped_files"]["files"]) == bad


def test_directory_named_like_an_image(cli, tmp_path):
    root = _folder(tmp_path / "data")
    odd = root / "train" / "dog" / "folder.jpg"
    odd.mkdir()
    Image.fromarray(_rgb(99)).save(odd / "inside.png")
    # A folder, whatever its name: walked into, never listed (nor decoded) as an image.
    files = _image_files(root / "train" / "dog")
    assert odd not in files and odd / "inside.png" in files
    assert _train_folder(cli, root, tmp_path).code == 0
    with pytest.raises(DataError, match="directory") as err:
        decode_file(odd)
    assert str(odd) in str(err.value)


def test_symlink_loop_of_folders_does_not_hang_the_scan(cli, tmp_path):
    root = _folder(tmp_path / "data")
    (root / "train" / "dog" / "up").symlink_to("..")  # dog/up/dog/up/... forever
    (root / "train" / "dog" / "self").symlink_to("self")  # ELOOP on every stat
    assert len(_image_files(root / "train" / "dog")) == 6
    assert _train_folder(cli, root, tmp_path).code == 0


def _converted(kind: str, folder: Path) -> tuple[Path, np.ndarray]:
    """Write an image that must be converted (not refused); returns it and its RGB."""
    rgb = _rgb(7)
    if kind == "cmyk_jpeg":
        path = folder / "cmyk.jpg"
        Image.fromarray(rgb).convert("CMYK").save(path, quality=95)
    elif kind == "png_16bit":
        path = folder / "grey16.png"
        grey = np.random.default_rng(1).integers(0, 65536, rgb.shape[:2], dtype=np.uint16)
        Image.fromarray(grey).save(path)
        high = (grey >> 8).astype(np.uint8)
        return path, np.repeat(high[..., None], 3, axis=-1)
    elif kind == "palette":
        path = folder / "palette.png"
        Image.fromarray(rgb).quantize(colors=16).save(path)
    elif kind == "palette_alpha":
        path = folder / "palette_alpha.png"
        im = Image.fromarray(rgb).quantize(colors=16)
        im.info["transparency"] = 3
        im.save(path, transparency=3)
    elif kind == "rgba":
        path = folder / "rgba.png"
        alpha = np.random.default_rng(2).integers(0, 256, rgb.shape[:2], dtype=np.uint8)
        Image.fromarray(np.dstack([rgb, alpha])).save(path)
    elif kind == "grey_alpha":
        path = folder / "la.png"
        Image.fromarray(rgb).convert("LA").save(path)
    else:
        raise AssertionError(kind)
    with Image.open(path) as im:
        return path, np.asarray(im.convert("RGB"))


CONVERTED = ["cmyk_jpeg", "png_16bit", "palette", "palette_alpha", "rgba", "grey_alpha"]


@pytest.mark.parametrize("kind", CONVERTED)
def test_odd_image_modes_are_converted_not_refused(tmp_path, kind):
    path, expected = _converted(kind, tmp_path)
    decoded = decode_file(path, channels=3)
    assert decoded.dtype == torch.uint8 and decoded.shape == (3, *expected.shape[:2])
    # CMYK goes through libjpeg's own inversion; it must match PIL's conversion.
    np.testing.assert_array_equal(decoded.permute(1, 2, 0).numpy(), expected)
    assert decode_file(path, channels=1).shape == (1, *expected.shape[:2])


def test_webp_as_grey_has_one_channel(tmp_path):
    # torchvision's WebP decoder ignores the grey mode; decode_file must not pass that on.
    path = tmp_path / "x.webp"
    Image.fromarray(_rgb(4)).save(path, lossless=True)
    grey = decode_file(path, channels=1)
    with Image.open(path) as im:
        expected = np.asarray(im.convert("L")).astype(int)
    assert grey.shape == (1, *expected.shape) and grey.dtype == torch.uint8
    assert np.abs(grey[0].numpy().astype(int) - expected).max() <= 1


def test_odd_image_modes_train(cli, tmp_path):
    root = _folder(tmp_path / "data")
    for kind in CONVERTED:
        _converted(kind, root / "train" / "dog")
    assert _train_folder(cli, root, tmp_path).code == 0


# ------------------------------------------------------------------------ annotations


# The loop settings of TINY_ANY; its sizes and model options are for generated sources.
LOOP_ONLY = ["data.batch_size=4", *(o for o in TINY_ANY if o.startswith(("train.", "run.")))]
COCO_RUN = ["task=detection", "model.name=fcos_tiny", "model.width=8", "data.image_size=32"]


def _coco(tmp_path: Path, annotations: list[dict], file_name: str = "a.png") -> Path:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(_rgb(len(name), 30, 40)).save(root / name)
    data = {
        "images": [
            {"id": 1, "file_name": file_name, "width": 40, "height": 30},
            {"id": 2, "file_name": "b.png", "width": 40, "height": 30},
            {"id": 3, "file_name": "c.png", "width": 40, "height": 30},
        ],
        "annotations": annotations
        or [{"id": 9, "image_id": 2, "category_id": 1, "bbox": [2, 2, 10, 10]}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))
    return root


def _train_coco(cli, root: Path, tmp_path: Path, *extra: str):
    return cli(
        "train",
        *COCO_RUN,
        *LOOP_ONLY,
        "data.name=coco",
        f"data.root={root}",
        f"run.dir={tmp_path / 'runs'}",
        *extra,
    )


@pytest.mark.parametrize(
    "file_name", ["../outside.png", "/etc/hostname", "link.png", "images/../../outside.png"]
)
def test_coco_file_name_outside_the_root(cli, tmp_path, file_name):
    Image.fromarray(_rgb(1, 30, 40)).save(tmp_path / "outside.png")
    root = _coco(tmp_path, [], file_name=file_name)
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    ann = root / "annotations" / "instances_train.json"
    refused(_train_coco(cli, root, tmp_path, "--check"), str(ann), "outside data.root")


def test_coco_file_name_that_is_a_symlink_loop_or_a_folder(cli, tmp_path):
    for name, needle in (("loop.png", "symbolic link loop"), ("dir.png", "directory")):
        root = _coco(tmp_path / name, [], file_name=name)
        (root / name).symlink_to(name) if name == "loop.png" else (root / name).mkdir()
        ann = root / "annotations" / "instances_train.json"
        refused(_train_coco(cli, root, tmp_path, "--check"), str(ann), needle, "image id 1")


def test_coco_boxes_outside_the_image_are_clipped_or_dropped(cli, tmp_path):
    root = _coco(
        tmp_path,
        [
            {"id": 1, "image_id": 2, "category_id": 1, "bbox": [30, 20, 20, 20]},  # partly
            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [100, 100, 5, 5]},  # wholly
            {"id": 3, "image_id": 3, "category_id": 2, "bbox": [-5, -5, 10, 10]},  # partly
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [1, 1, 8, 8]},
        ],
    )
    res = _train_coco(cli, root, tmp_path)
    assert res.code == 0, res.err
    output = res.out + res.err
    assert "dropped 1 boxes entirely outside their image" in output
    assert "clipped 2 boxes to their image" in output


def test_coco_unknown_category_id(cli, tmp_path):
    bad = {"id": 77, "image_id": 2, "category_id": 5, "bbox": [2, 2, 10, 10]}
    root = _coco(tmp_path, [bad])
    ann = root / "annotations" / "instances_train.json"
    refused(
        _train_coco(cli, root, tmp_path, "--check"),
        str(ann),
        "annotation 77",
        "category_id 5",
        "Add it to 'categories'",
    )


def _mask_tree(root: Path, top: int) -> Path:
    for i in range(4):
        Image.fromarray(_rgb(i, 10, 12)).save(_mkparent(root / "train/images" / f"m{i}.png"))
        mask = np.zeros((10, 12), np.uint8)
        mask[2:5, 3:9] = 1 + i % 2
        mask[8:, :] = 255  # ignore stays ignore
        mask[0, 0] = top if i == 0 else 0
        Image.fromarray(mask).save(_mkparent(root / "train/masks" / f"m{i}.png"))
    (root / "classes.txt").write_text("background\nroad\ncar\n")
    return root


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("top", [3, 254])
def test_mask_class_id_above_the_class_count(cli, tmp_path, top):
    root = _mask_tree(tmp_path / "seg", top)
    res = cli(
        "train",
        "task=segmentation",
        "model.name=unet",
        "data.name=masks",
        f"data.root={root}",
        "data.val_split=0.25",
        *LOOP_ONLY,
        f"run.dir={tmp_path / 'runs'}",
    )
    mask = root / "train/masks/m0.png"
    refused(res, str(mask), f"has value {top}", "3 classes", "classes.txt")


# ---------------------------------------------------------- property: config overrides

LEAF_KEYS = sorted(set(all_keys()) - {k.rsplit(".", 1)[0] for k in all_keys() if "." in k})
# Keys whose valid values can cost real time or memory in `--check` (a million generated
# images, a 4096-pixel working size, a loader measurement, a download, a run folder
# elsewhere): random values for them go through load_config only.
COSTLY = {
    "data.train_size",
    "data.val_size",
    "data.test_size",
    "data.image_size",
    "data.epoch_samples",
    "data.num_workers",
    "data.download",
    "data.cache",
    "data.cache_dir",
    "data.root",
    "model.pretrained",
    "model.width",
    "model.depth",
    "model.name",
    "model.encoder",
    "run.dir",
    "run.resume",
    "run.name",
    "run.loggers",
    "run.mlflow_uri",
    "train.compile",
    "train.device",
    "optim.lr",  # `find` runs the LR range test
}


def _yaml(value: object) -> str:
    """A value as the command line would write it."""
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_yaml(v) for v in value) + "]"
    return str(value)


VALUES = st.one_of(
    st.integers(-(10**12), 10**12),
    st.integers(0, 300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 1),
    st.booleans(),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-3, 3), st.floats(-2, 2)), max_size=3),
    st.sampled_from(
        [
            "find",
            "auto",
            "none",
            "null",
            "~",
            "[]",
            "{}",
            "best_f1",
            "recall>=0.9",
            "types",
            "weighted",
            "bf16",
            "!!python/object/apply:os.system [true]",
            "{a: 1}",
            "1e-3",
        ]
    ),
)


def _misspell(key: str, at: int, char: str) -> str:
    at %= len(key)
    return key[:at] + char + key[at + 1 :]


def overrides(keys: list[str], most: int = 4) -> st.SearchStrategy[list[str]]:
    right = st.builds(lambda k, v: f"{k}={_yaml(v)}", st.sampled_from(keys), VALUES)
    wrong = st.builds(
        lambda k, at, c, v: f"{_misspell(k, at, c)}={_yaml(v)}",
        st.sampled_from(keys),
        st.integers(0, 40),
        st.sampled_from("xq._"),
        VALUES,
    )
    return st.lists(st.one_of(right, right, right, wrong), min_size=1, max_size=most)


@settings(max_examples=300, deadline=None)
@given(items=overrides(LEAF_KEYS))
def test_property_load_config_is_a_config_or_a_config_error(items):
    try:
        cfg = load_config(None, items)
    except ConfigError as exc:
        message = str(exc)
        assert message and "Traceback" not in message
    else:
        assert isinstance(cfg, Config)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(items=overrides(sorted(set(LEAF_KEYS) - COSTLY), most=2))
def test_property_random_overrides_run_or_exit_2(cli, tmp_path, items):
    res = cli("train", "--check", *TINY, *items, f"run.dir={tmp_path / 'runs'}")
    assert res.code in (0, 2), (items, res.err[-3000:])
    event(f"exit {res.code}")
    if res.code == 2:
        refused(res)


# ---------------------------------------------------------- fuzz: corrupted image bytes

FUZZ_CHILD = textwrap.dedent(
    """
    import io, json, random, signal, sys, tempfile
    from pathlib import Path
    import numpy as np, torch
    from PIL import Image
    from visiontrain.data.images import decode_file
    from visiontrain.errors import DataError

    def on_alarm(signum, frame):
        raise SystemExit(f"hang on case {case}")

    signal.signal(signal.SIGALRM, on_alarm)
    rng = random.Random(int(sys.argv[1]))
    pixels = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    bases = {}
    for fmt, ext, kw in [("PNG", ".png", {}), ("JPEG", ".jpg", {"quality": 85}),
                         ("JPEG", ".jpeg", {"progressive": True}), ("WEBP", ".webp", {}),
                         ("BMP", ".bmp", {})]:
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt, **kw)
        bases[ext] = buf.getvalue()
    folder = Path(tempfile.mkdtemp())
    outcomes = {"ok": 0, "refused": 0}
    for case in range(int(sys.argv[2])):
        ext = rng.choice(sorted(bases))
        data = bytearray(bases[ext])
        for _ in range(rng.randint(1, 3)):
            op = rng.choice(["truncate", "flip", "insert", "zero_head", "size", "dup"])
            n = len(data)
            if op == "truncate" and n > 1:
                del data[rng.randrange(1, n):]
            elif op == "flip":
                for _ in range(rng.randint(1, 16)):
                    data[rng.randrange(n)] = rng.randrange(256)
            elif op == "insert":
                at = rng.randrange(n + 1)
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
            elif op == "zero_head":
                data[: rng.randint(1, 32)] = bytes(min(n, 32))[: rng.randint(1, 32)]
            elif op == "size" and n > 24:  # where PNG IHDR / BMP / JPEG SOF keep sizes
                at = rng.randrange(min(n - 4, 200))
                data[at:at + 4] = rng.randrange(2**32).to_bytes(4, "big")
            elif op == "dup" and n > 8:
                a = rng.randrange(n - 4)
                data[a:a] = data[a:a + rng.randint(4, 200)]
        path = folder / f"case{case}{ext}"
        path.write_bytes(bytes(data))
        channels = rng.choice([1, 3])
        signal.alarm(20)
        try:
            img = decode_file(path, channels)
        except DataError as exc:
            assert str(path) in str(exc), str(exc)
            outcomes["refused"] += 1
        else:
            assert img.dtype == torch.uint8 and img.ndim == 3, (img.dtype, img.shape)
            assert img.shape[0] == channels, img.shape
            outcomes["ok"] += 1
        signal.alarm(0)
        path.unlink()
    print(json.dumps(outcomes))
    """
)


def test_fuzz_corrupted_image_bytes_never_crash_or_hang(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", FUZZ_CHILD, "1234", "300"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    # A segfault in a native decoder shows as a negative return code, a hang as rc 1
    # with "hang on case"; any exception other than DataError as a traceback.
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcomes["ok"] + outcomes["refused"] == 300
    assert outcomes["refused"] > 0
