"""The documented defaults and lists match the code, so the docs cannot drift again."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from visiontrain.config import DEFAULT_LOSS
from visiontrain.data.sources import DEFAULT_IMAGE_SIZES
from visiontrain.losses import list_losses
from visiontrain.models.registry import list_models

ROOT = Path(__file__).resolve().parents[1]
CONFIG_MD = (ROOT / "docs" / "config.md").read_text()


def _row(key: str) -> str:
    line = next(ln for ln in CONFIG_MD.splitlines() if ln.startswith(f"| `{key}` |"))
    return line


def test_documented_image_size_defaults_are_the_sources():
    row = _row("data.image_size")
    documented = dict(re.findall(r"(\w+) (\d+)", row.split("Defaults:", 1)[1]))
    assert {k: int(v) for k, v in documented.items()} == DEFAULT_IMAGE_SIZES


def test_documented_losses_per_task_are_the_registered_ones():
    row = _row("loss.name")
    for task in ("classification", "multilabel", "regression", "segmentation"):
        label = task.capitalize()
        part = row.split(f"{label}:", 1)[1].split(". ", 1)[0]
        names = set(re.findall(r"`(\w+)`", part))
        assert names == set(list_losses(task)), task
        assert f"`{DEFAULT_LOSS[task]}` (default)" in part, task


def test_documented_dense_models_are_the_registered_ones():
    text = " ".join(CONFIG_MD.split("Detection models:", 1)[1].split("\n\n", 1)[0].split())
    detection, segmentation = text.split("Segmentation models:", 1)
    assert set(re.findall(r"`(\w+)`", detection)) >= set(list_models("detection"))
    assert set(re.findall(r"`(\w+)`", segmentation)) >= set(list_models("segmentation"))
    assert not set(re.findall(r"`(\w+)`", detection)) - set(list_models("detection")) - {"model"}


def test_docs_name_the_model_each_shipped_config_trains():
    cli = (ROOT / "docs" / "cli.md").read_text()
    for config in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = yaml.safe_load(config.read_text()) or {}
        model = (cfg.get("model") or {}).get("name")
        for line in cli.splitlines():
            if f"configs/{config.name}" in line and "#" in line and model:
                comment = line.split("#", 1)[1]
                if "model" in comment or any(m in comment for m in list_models("detection")):
                    assert model in comment, (config.name, line)


def test_readme_held_out_share_is_the_shipped_configs():
    readme = (ROOT / "README.md").read_text()
    share = yaml.safe_load((ROOT / "configs" / "imagefolder.yaml").read_text())["data"]["val_split"]
    assert f"{share} in configs/imagefolder.yaml" in readme
    assert "10% of train is held out" not in readme
