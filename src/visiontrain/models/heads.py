"""Where a model's head ends and its backbone begins, per model family.

Transfer learning treats the two differently: a head whose class count differs from the
source's is re-initialised, the backbone may train at a lower learning rate, and
``train.freeze_epochs`` trains the head alone first. The rules, tried in order:

1. A timm model names its classifier in ``pretrained_cfg["classifier"]`` (``fc``,
   ``head.fc``; what its ``get_classifier()`` returns).
2. A model with a ``backbone`` or ``encoder`` (torchvision detectors and segmenters,
   segmentation-models-pytorch): everything beside it is the head (a detector's RPN and
   RoI heads, a segmenter's decoder and segmentation head).
3. torchvision classifiers and visiontrain's own: the outermost ``fc``, ``classifier``,
   ``heads`` or ``head`` module.
4. Any other module (a user's own): its last module that holds parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

HEAD_NAMES = ("fc", "classifier", "heads", "head")
BACKBONE_NAMES = ("backbone", "encoder")


@dataclass(frozen=True)
class HeadSplit:
    """A model's head, as module-name prefixes, and how it was found.

    Attributes:
        head: Module names (``fc``, ``roi_heads``) whose parameters form the head.
        rule: Which rule found them, for the notes.
    """

    head: tuple[str, ...]
    rule: str

    def is_head(self, name: str) -> bool:
        """Whether a parameter or state-dict key ``name`` belongs to the head."""
        return any(name == p or name.startswith(p + ".") for p in self.head)


def _timm_head(model: nn.Module) -> tuple[str, ...] | None:
    cfg = getattr(model, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or not hasattr(model, "get_classifier"):
        return None
    names = cfg.get("classifier")
    if not names:
        return None
    names = (names,) if isinstance(names, str) else tuple(names)
    modules = dict(model.named_modules())
    found = tuple(n for n in names if n in modules)
    return found or None


def backbone_name(model: nn.Module) -> str | None:
    """The shallowest module named ``backbone`` or ``encoder`` (``model.backbone``), or None."""
    best: str | None = None
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in BACKBONE_NAMES and (
            best is None or name.count(".") < best.count(".")
        ):
            best = name
    return best


def _beside_backbone(model: nn.Module) -> tuple[str, ...] | None:
    """Every parameter-holding module beside the backbone, at the backbone's own level."""
    name = backbone_name(model)
    if name is None:
        return None
    parent_name, _, own = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    prefix = f"{parent_name}." if parent_name else ""
    return tuple(
        prefix + child_name
        for child_name, child in parent.named_children()
        if child_name != own and any(True for _ in child.parameters())
    )


def _named_head(model: nn.Module) -> tuple[str, ...] | None:
    best: str | None = None
    for name, module in model.named_modules():
        if (
            name.rsplit(".", 1)[-1] in HEAD_NAMES
            and any(True for _ in module.parameters())
            and (best is None or name.count(".") < best.count("."))
        ):
            best = name
    return (best,) if best is not None else None


def _last_module(model: nn.Module) -> tuple[str, ...] | None:
    last: str | None = None
    for name, module in model.named_modules():
        if name and any(True for _ in module.parameters(recurse=False)):
            last = name
    return (last,) if last is not None else None


_RULES = (
    ("timm pretrained_cfg['classifier']", _timm_head),
    ("everything beside the backbone/encoder", _beside_backbone),
    ("the outermost fc/classifier/heads/head module", _named_head),
    ("the last module with parameters", _last_module),
)


def find_head(model: nn.Module) -> HeadSplit:
    """The model's head by the first rule that finds one (see the module docstring)."""
    for rule, fn in _RULES:
        head = fn(model)
        if head:
            return HeadSplit(head, rule)
    return HeadSplit((), "none: the model has no parameters")
