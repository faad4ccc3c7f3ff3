"""Which parameters train: ``model.freeze`` (never) and ``train.freeze_epochs`` (head first).

Frozen parameters have ``requires_grad=False``: they get no gradient, so the optimizer
keeps no state for them (AdamW skips a parameter whose ``grad`` is None). Parameters of
``model.freeze`` are not even given to the optimizer. Those frozen only for the first
``train.freeze_epochs`` are in the optimizer from the start and begin to collect state when
they unfreeze — fastai's ``fine_tune``: the head trains alone on a schedule of its own,
then everything trains on a fresh warmup and decay (engine/schedules.py). The phase is a
function of the epoch, so a resume on either side of the boundary is exact.
"""

from __future__ import annotations

from torch import nn

from visiontrain.errors import ConfigError
from visiontrain.models.heads import HeadSplit


def freeze_prefixes(model: nn.Module, prefixes: list[str]) -> str:
    """``model.freeze``: turn off gradients under each module-name prefix; returns a note.

    Raises:
        ConfigError: a prefix names no module (with the model's top-level names).
    """
    modules = dict(model.named_modules())
    unknown = [p for p in prefixes if p not in modules]
    if unknown:
        top = ", ".join(n for n, _ in model.named_children())
        raise ConfigError(
            f"model.freeze: {', '.join(unknown)} names no module of {type(model).__name__}. "
            f"Use module names such as {top} (dotted for deeper ones: layer1.0)."
        )
    count = 0
    for prefix in prefixes:
        for p in modules[prefix].parameters():
            count += p.numel() if p.requires_grad else 0
            p.requires_grad_(False)
    total = sum(p.numel() for p in model.parameters())
    return f"model.freeze: {', '.join(prefixes)} never train ({count:,} of {total:,} parameters)"


class FreezePhase:
    """``train.freeze_epochs``: the head alone trains for the first N epochs.

    Args:
        model: The plain module (not a DDP wrapper).
        head: Its head (models/heads.py).
        epochs: ``train.freeze_epochs``.
    """

    def __init__(self, model: nn.Module, head: HeadSplit, epochs: int) -> None:
        self.epochs = epochs
        # Only what may train at all: model.freeze stays frozen after the unfreeze.
        self.body = [
            p for n, p in model.named_parameters() if p.requires_grad and not head.is_head(n)
        ]
        if epochs and not self.body:
            raise ConfigError(
                f"train.freeze_epochs={epochs}: every trainable parameter of "
                f"{type(model).__name__} is in its head ({', '.join(head.head)}), so there is "
                "nothing to freeze. Remove the key."
            )
        if epochs and len(self.body) == sum(1 for p in model.parameters() if p.requires_grad):
            raise ConfigError(
                f"train.freeze_epochs={epochs}: no head found in {type(model).__name__} "
                f"({head.rule}); name its head module fc, classifier, head or heads."
            )
        self.frozen = False

    def head_only(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) trains the head alone."""
        return epoch < self.epochs

    def apply(self, epoch: int) -> bool:
        """Set the trainable parameters for ``epoch``; True when that changed them."""
        frozen = self.head_only(epoch)
        if frozen == self.frozen:
            return False
        for p in self.body:
            p.requires_grad_(not frozen)
            if frozen:
                p.grad = None
        self.frozen = frozen
        return True
