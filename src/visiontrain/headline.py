"""The order metrics are shown in: headlines first, then per class and per target.

A module of constants only (no torch), so the command line can import it at start.
"""

from __future__ import annotations

# Headline metrics shown first, in this order, when present; the rest follow alphabetically.
HEADLINE_ORDER = (
    "loss",
    # Only detection and multilabel have a map; there it is the headline.
    "map",
    "accuracy",
    "macro_f1",
    "micro_f1",
    "subset_accuracy",
    "hamming_loss",
    "average_precision",
    "threshold",
    "mae",
    "rmse",
    "r2",
    "map_50",
    "map_75",
    "miou",
    "dice",
    "pixel_accuracy",
)


# Scalar entries of a split's metrics that are not metrics of the model.
NOT_HEADLINE = frozenset({"samples"})


PER_CLASS_ORDER = ("precision", "recall", "f1", "ap", "support", "threshold")


PER_TARGET_ORDER = ("mae", "rmse", "r2")
