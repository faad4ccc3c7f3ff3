"""Load a state dict read from disk into a model: match it, load it, report what it did.

The files are read by :mod:`visiontrain.engine.weights` (run directories, checkpoints,
state dicts, safetensors, the libraries' caches); here a :class:`WeightsSource` is only
tensors by key.

Matching, key by key against the model's own ``state_dict``:

- equal shapes load;
- a head tensor (``models/heads.py``) of another shape is re-initialised: the class
  count differs from the source's;
- the first convolution with another input-channel count is adapted as timm adapts it
  (``adapt_input_conv``: summed for one channel, repeated and rescaled otherwise);
- keys only the model has keep their initialisation (missing), keys only the file has
  are left out (unexpected);
- any other shape mismatch refuses the run, naming the keys.

A common key prefix is found by itself (``module.``, ``_orig_mod.``, a classifier's
``features.`` against a detector backbone's ``body.``). timm models are then loaded by
timm's own ``load_pretrained`` with the checked state dict in their ``pretrained_cfg``
(the ``pretrained_cfg_overlay`` path): timm drops a classifier of another class count and
adapts ``in_chans`` as timm users expect. Other models load with ``strict=False`` over
the same matched keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontrain.errors import ConfigError
from visiontrain.models.heads import HeadSplit, backbone_name, find_head


@dataclass
class WeightsSource:
    """A state dict read from disk, and what it was.

    Attributes:
        path: The file the tensors came from.
        kind: What the file is, for the notes (``visiontrain checkpoint (EMA weights)``).
        state: Parameter and buffer tensors by key.
    """

    path: Path
    kind: str
    state: dict[str, torch.Tensor]


# --------------------------------------------------------------------------- matching


@dataclass
class WeightsReport:
    """What loading a weights source into a model (or its backbone) did.

    Attributes:
        key: The config key that asked (``model.weights``).
        source: The file read.
        kind: What it was.
        into: ``model`` or the backbone's module name.
        loaded: Keys loaded as they are.
        reinitialised: Head keys of another shape, with (source, model) shapes.
        adapted: Input-conv keys adapted to the channel count, with both shapes.
        missing: Keys only the model has (they keep their initialisation).
        unexpected: Keys only the source has (left out).
        renamed: The prefix rewrite that matched the keys (``features. -> body.``).
        head_rule: How the head was found.
        module: The submodule loaded into (``backbone``); empty for the whole model.
    """

    key: str
    source: str
    kind: str
    into: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    adapted: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    renamed: str | None = None
    head_rule: str = ""
    # The submodule loaded into (``backbone``), empty for the whole model.
    module: str = ""

    def notes(self) -> list[str]:
        """One ``note:`` line per non-empty key group."""
        where = "" if self.into == "model" else f" into {self.into}"
        out = [
            f"{self.key}: {self.kind} {self.source}{where}: loaded {len(self.loaded)} tensors "
            f"({_groups(self.loaded)})" + (f"; keys renamed {self.renamed}" if self.renamed else "")
        ]
        if self.reinitialised:
            shapes = ", ".join(
                f"{k} {tuple(s)} -> {tuple(d)}" for k, (s, d) in self.reinitialised.items()
            )
            out.append(
                f"{self.key}: re-initialised head {_groups(self.reinitialised)} (the class "
                f"count differs: {shapes}; head found by {self.head_rule})"
            )
        if self.adapted:
            shapes = ", ".join(
                f"{k} {tuple(s)} -> {tuple(d)}" for k, (s, d) in self.adapted.items()
            )
            out.append(f"{self.key}: input channels adapted as timm does: {shapes}")
        if self.missing:
            out.append(
                f"{self.key}: {len(self.missing)} model tensors not in the file keep their "
                f"initialisation ({_groups(self.missing)})"
            )
        if self.unexpected:
            out.append(
                f"{self.key}: {len(self.unexpected)} tensors of the file have no place in the "
                f"model and were left out ({_groups(self.unexpected)})"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report for ``summary.json`` (key groups plus counts)."""
        return {
            "key": self.key,
            "source": self.source,
            "kind": self.kind,
            "into": self.into,
            "renamed": self.renamed,
            "head_rule": self.head_rule,
            "loaded": {"count": len(self.loaded), "groups": _group_list(self.loaded)},
            "reinitialised": {
                k: {"file": s, "model": d} for k, (s, d) in self.reinitialised.items()
            },
            "adapted": {k: {"file": s, "model": d} for k, (s, d) in self.adapted.items()},
            "missing": {"count": len(self.missing), "groups": _group_list(self.missing)},
            "unexpected": {"count": len(self.unexpected), "groups": _group_list(self.unexpected)},
        }


def _shapes(keys: dict[str, tuple[list[int], list[int]]]) -> dict[str, dict[str, list[int]]]:
    return {k: {"file": s, "model": d} for k, (s, d) in keys.items()}


def _module_of(key: str) -> str:
    return key.rsplit(".", 1)[0] if "." in key else key


def _group_list(keys: Iterable[str], depth: int = 2) -> list[str]:
    """Module prefixes of ``keys`` at up to ``depth`` levels, in first-seen order."""
    seen: dict[str, None] = {}
    for k in keys:
        parts = _module_of(k).split(".")
        seen[".".join(parts[:depth])] = None
    return list(seen)


def _groups(keys: Iterable[str], limit: int = 6) -> str:
    groups = _group_list(keys)
    shown = ", ".join(groups[:limit])
    return shown + (f", +{len(groups) - limit} more" if len(groups) > limit else "")


def _first_conv(target: dict[str, torch.Tensor]) -> str | None:
    return next((k for k, v in target.items() if v.ndim == 4 and k.endswith("weight")), None)


def _rename(state: dict[str, torch.Tensor], strip: str, add: str) -> dict[str, torch.Tensor]:
    return {add + k[len(strip) :]: v for k, v in state.items() if k.startswith(strip)}


def _best_prefixes(src: Iterable[str], dst: Iterable[str]) -> tuple[str, str]:
    """The (strip, add) prefix pair under which most source keys name model keys."""
    src, dst = list(src), set(dst)

    def tops(keys: Iterable[str]) -> list[str]:
        return sorted({k.split(".", 1)[0] + "." for k in keys if "." in k})

    best, best_n = ("", ""), sum(k in dst for k in src)
    for strip in ["", *tops(src)]:
        for add in ["", *tops(dst)]:
            if strip == add:
                continue
            n = sum(add + k[len(strip) :] in dst for k in src if k.startswith(strip))
            if n > best_n:
                best, best_n = (strip, add), n
    return best


@dataclass
class _Plan:
    state: dict[str, torch.Tensor]  # what to load: matched keys, adapted input conv
    raw_conv: tuple[str, torch.Tensor] | None  # the input conv as the file has it
    source_classes: int | None
    report: WeightsReport


def _plan(source: WeightsSource, module: nn.Module, head: HeadSplit, key: str, into: str) -> _Plan:
    target = module.state_dict()
    strip, add = _best_prefixes(source.state, target)
    src = _rename(source.state, strip, add) if (strip or add) else dict(source.state)
    report = WeightsReport(
        key, str(source.path), source.kind, into,
        renamed=f"`{strip or '(none)'}` -> `{add or '(none)'}`" if (strip or add) else None,
        head_rule=head.rule,
    )  # fmt: skip
    state: dict[str, torch.Tensor] = {}
    conv = _first_conv(target)
    raw_conv = None
    mismatched: list[str] = []
    source_classes = None
    for k, t in target.items():
        if k not in src:
            report.missing.append(k)
            continue
        v = src[k]
        if head.is_head(k) and v.ndim >= 1 and source_classes is None and k.endswith("weight"):
            source_classes = int(v.shape[0])
        if tuple(v.shape) == tuple(t.shape):
            state[k] = v
            report.loaded.append(k)
        elif head.is_head(k):
            report.reinitialised[k] = (list(v.shape), list(t.shape))
        elif k == conv and v.ndim == 4 and v.shape[0] == t.shape[0] and v.shape[2:] == t.shape[2:]:
            from timm.models import adapt_input_conv

            try:
                state[k] = adapt_input_conv(int(t.shape[1]), v, base_chans=int(v.shape[1]))
            except (NotImplementedError, AssertionError, ValueError):
                mismatched.append(
                    f"{k} {tuple(v.shape)} in the file, {tuple(t.shape)} in the model"
                )
                continue
            raw_conv = (k, v)
            report.adapted[k] = (list(v.shape), list(t.shape))
        else:
            mismatched.append(f"{k} {tuple(v.shape)} in the file, {tuple(t.shape)} here")
    report.unexpected = [k for k in src if k not in target]
    report.unexpected += [k for k in source.state if (strip or add) and not k.startswith(strip)]
    if mismatched:
        shown = "; ".join(mismatched[:5]) + (
            f"; +{len(mismatched) - 5} more" if len(mismatched) > 5 else ""
        )
        raise ConfigError(
            f"{key}={source.path} does not fit the {into}: {len(mismatched)} tensors outside "
            f"the head differ in shape ({shown}). The file was written for another "
            "architecture or size: use the model.name (and model.width/depth/encoder) it was "
            "trained with, or load it as model.backbone_weights into a detector or segmenter."
        )
    if not report.loaded:
        raise ConfigError(
            f"{key}={source.path} shares no tensor with the {into} (file keys such as "
            f"{', '.join(list(source.state)[:3])}; model keys such as "
            f"{', '.join(list(target)[:3])}). Pass weights of this architecture."
        )
    return _Plan(state, raw_conv, source_classes, report)


def load_weights(
    module: nn.Module,
    source: WeightsSource,
    key: str = "model.weights",
    into: str = "model",
    head: HeadSplit | None = None,
) -> WeightsReport:
    """Load ``source`` into ``module`` as the module docstring describes; report what loaded.

    Args:
        module: The model (or its backbone).
        source: From :func:`read_weights`.
        key: The config key that asked, for messages and notes.
        into: ``model`` or the backbone's name, for messages.
        head: The model's head (re-initialised on a class-count change); default: found.

    Raises:
        ConfigError: a tensor outside the head differs in shape, or nothing matches.
    """
    head = head if head is not None else find_head(module)
    plan = _plan(source, module, head, key, into)
    if _is_timm(module):
        _load_with_timm(module, plan)
    else:
        module.load_state_dict(plan.state, strict=False)
    return plan.report


def _is_timm(module: nn.Module) -> bool:
    return isinstance(getattr(module, "pretrained_cfg", None), dict) and type(
        module
    ).__module__.startswith("timm.")


def _load_with_timm(module: nn.Module, plan: _Plan) -> None:
    """Timm's own ``load_pretrained`` with the checked state dict as its source.

    The state dict is made complete (missing keys from the model itself, so timm's strict
    load accepts it; unexpected keys left out); the input conv goes in as the file has it
    and ``input_size`` declares its channels, so timm adapts it; ``num_classes`` is the
    source's, so timm drops a classifier of another class count.
    """
    from timm.models import load_pretrained

    own = module.state_dict()
    reinit = plan.report.reinitialised
    state = {k: plan.state.get(k, own[k]) for k in own if k not in reinit}
    cfg = dict(module.pretrained_cfg)
    in_chans = _in_chans(module, own)
    src_chans = in_chans
    if plan.raw_conv is not None:
        name, raw = plan.raw_conv
        state[name] = raw
        src_chans = int(raw.shape[1])
    size = tuple(cfg.get("input_size") or (3, 224, 224))
    num_classes = int(getattr(module, "num_classes", -1))
    source_classes = num_classes  # the head matches: timm keeps it, loading strictly
    if reinit:
        # Another class count: timm drops its classifier and loads the rest non-strictly
        # (the head's keys are left out of the state dict for any head timm does not name).
        source_classes = plan.source_classes
        if source_classes is None or source_classes == num_classes:
            source_classes = -1
    cfg.update(state_dict=state, input_size=(src_chans, *size[1:]), num_classes=source_classes)
    cfg.pop("file", None)
    if plan.raw_conv is not None:
        cfg["first_conv"] = plan.raw_conv[0].removesuffix(".weight")
    load_pretrained(module, pretrained_cfg=cfg, num_classes=num_classes, in_chans=in_chans)


def _in_chans(module: nn.Module, own: dict[str, torch.Tensor]) -> int:
    conv = _first_conv(own)
    return int(own[conv].shape[1]) if conv is not None else 3


def load_backbone_weights(model: nn.Module, source: WeightsSource) -> WeightsReport:
    """``model.backbone_weights``: ``source`` into the model's backbone or encoder only.

    Raises:
        ConfigError: the model has no ``backbone``/``encoder`` module, or the weights do
            not fit it.
    """
    name = backbone_name(model)
    if name is None:
        raise ConfigError(
            f"model.backbone_weights: {type(model).__name__} has no `backbone` or `encoder` "
            "module to load into. Use model.weights for the whole model."
        )
    backbone = model.get_submodule(name)
    # A backbone has no head: a classifier's head in the file is simply unexpected.
    report = load_weights(
        backbone, source, "model.backbone_weights", f"backbone `{name}`", HeadSplit((), "")
    )
    report.module = name
    return report
