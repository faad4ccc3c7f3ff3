"""visiontrain: train vision models fast, correctly and reproducibly.

The public Python API (``import visiontrain as vt``); the command line is a thin layer
over it (docs/python.md)::

    result = vt.train("configs/defects.yaml", "optim.lr=3e-4", train={"epochs": 5})
    run = vt.build_trainer(cfg, model=MyNet(), data=vt.data.from_datasets(train, val,
                           classes=["ok", "defect"]), callbacks=[MyCallback()])
    result = run.fit()
    vt.load(result.run_dir).predict(["a.png", "b.png"])

Names are imported on first use, so ``import visiontrain`` (and every CLI start) stays
fast: the training stack loads when a function of it is called.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from visiontrain.version import __version__

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from visiontrain import data
    from visiontrain.api import (
        Predictor,
        ProfileResult,
        Run,
        TrainResult,
        build_trainer,
        evaluate,
        load,
        profile,
        resolve_config,
        train,
    )
    from visiontrain.config import Config
    from visiontrain.data.sources import register_source
    from visiontrain.engine.callbacks import Callback
    from visiontrain.errors import (
        CheckpointError,
        ConfigError,
        DataError,
        Interrupted,
        RunError,
        UserError,
    )
    from visiontrain.losses import register_loss
    from visiontrain.models.registry import register_model

# Public name → the module that defines it.
_EXPORTS = {
    "train": "visiontrain.api",
    "build_trainer": "visiontrain.api",
    "load": "visiontrain.api",
    "evaluate": "visiontrain.api",
    "resolve_config": "visiontrain.api",
    "Run": "visiontrain.api",
    "TrainResult": "visiontrain.api",
    "Predictor": "visiontrain.api",
    "profile": "visiontrain.api",
    "ProfileResult": "visiontrain.api",
    "Config": "visiontrain.config",
    "Callback": "visiontrain.engine.callbacks",
    "register_model": "visiontrain.models.registry",
    "register_source": "visiontrain.data.sources",
    "register_loss": "visiontrain.losses",
    "UserError": "visiontrain.errors",
    "ConfigError": "visiontrain.errors",
    "DataError": "visiontrain.errors",
    "CheckpointError": "visiontrain.errors",
    "RunError": "visiontrain.errors",
    "Interrupted": "visiontrain.errors",
}

__all__ = [
    "Callback",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "Interrupted",
    "Predictor",
    "ProfileResult",
    "Run",
    "RunError",
    "TrainResult",
    "UserError",
    "__version__",
    "build_trainer",
    "data",
    "evaluate",
    "load",
    "profile",
    "register_loss",
    "register_model",
    "register_source",
    "resolve_config",
    "train",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562)."""
    if name == "data":
        return importlib.import_module("visiontrain.data")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'visiontrain' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
