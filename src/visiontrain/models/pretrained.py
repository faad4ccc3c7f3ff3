"""``model.pretrained=true`` resolved to a file on disk, where each library caches its weights.

torchvision keeps ImageNet weights under ``$TORCH_HOME/hub/checkpoints/<file of the URL>``;
timm keeps them in the Hugging Face cache (``$HF_HUB_CACHE``, honouring
``HF_HUB_OFFLINE=1``), or under torch's hub folder for weights that only have a URL. A
file already there is used without touching the network; otherwise it is downloaded once
(the user asked for it), and when that fails the message names the exact file expected
and how to put it there. The file then loads through :mod:`visiontrain.models.weights`,
like ``model.weights``: the ImageNet classifier is re-initialised for the data's classes.
"""

from __future__ import annotations

import os
from pathlib import Path

from visiontrain.errors import ConfigError

# timm's Hugging Face files, in the order timm itself tries them.
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


def torch_hub_checkpoint(url: str) -> Path:
    """Where ``torch.hub`` caches the file of ``url`` (``$TORCH_HOME/hub/checkpoints``)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])


def _from_url(url: str, model: str) -> Path:
    """The cached file of ``url``, downloaded when it is not there yet."""
    import torch

    path = torch_hub_checkpoint(url)
    if path.is_file():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as exc:  # urllib's, OSError, ...: every failure reads the same
        raise ConfigError(
            f"model.pretrained=true: the weights of {model} are expected at {path}, which "
            f"does not exist, and downloading them failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}). On a machine with "
            f"network fetch {url} and copy it to that path (or set TORCH_HOME to a folder "
            "whose hub/checkpoints holds it), or pass the file as model.weights=PATH."
        ) from None
    return path


def torchvision_file(name: str) -> Path:
    """The ImageNet weights file of torchvision classifier ``name`` (its ``DEFAULT``)."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        raise ConfigError(
            f"model.pretrained=true: torchvision has no pretrained weights for {name}; set "
            "model.pretrained=false or pass model.weights=PATH."
        ) from None
    return _from_url(weights.url, f"torchvision:{name}")


def timm_file(name: str) -> Path:
    """The pretrained weights file of timm model ``name`` (``resnet18`` or ``resnet18.tag``).

    Looked up in the Hugging Face cache first (no network), then downloaded through
    ``huggingface_hub`` unless ``HF_HUB_OFFLINE`` is set; weights with only a URL go
    through torch's hub cache.
    """
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise ConfigError(
            f"model.pretrained=true: timm has no pretrained weights for {name}; set "
            "model.pretrained=false or pass model.weights=PATH."
        )
    if not cfg.hf_hub_id:
        if not cfg.url:
            raise ConfigError(f"model.pretrained=true: timm lists no weights file for {name}.")
        return _from_url(cfg.url, f"timm:{name}")
    import huggingface_hub
    from huggingface_hub import constants

    repo = cfg.hf_hub_id
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_FILES
    for filename in files:
        cached = huggingface_hub.try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
    folder = f"models--{repo.replace('/', '--')}"
    expected = f"{constants.HF_HUB_CACHE}/{folder}/snapshots/<revision>/{files[0]}"
    how = (
        f"On a machine with network run `python -c \"import timm; timm.create_model('{name}', "
        f'pretrained=True)"` and copy {constants.HF_HUB_CACHE} here (or set HF_HUB_CACHE), '
        "or download the file and pass it as model.weights=PATH."
    )
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"model.pretrained=true: the weights of {name} ({repo}/{files[0]}) are not in the "
            f"Hugging Face cache (expected {expected}) and HF_HUB_OFFLINE is set. {how}"
        )
    try:
        return Path(huggingface_hub.hf_hub_download(repo, files[0]))
    except Exception as exc:  # network, HTTP and repository errors alike
        raise ConfigError(
            f"model.pretrained=true: the weights of {name} ({repo}/{files[0]}) are not in the "
            f"Hugging Face cache (expected {expected}) and downloading them failed "
            f"({type(exc).__name__}). {how}"
        ) from None


PRETRAINED_FILES = {"timm": timm_file, "torchvision": torchvision_file}
