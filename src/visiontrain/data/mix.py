"""MixUp and CutMix of whole training batches on the device, with soft targets.

MixUp (Zhang et al. 2018) blends each image with a partner, ``lam * x + (1 - lam) * x_p``;
CutMix (Yun et al. 2019) pastes a box of the partner into it, and ``lam`` becomes the
area left of the image. The target is blended the same way, a distribution over the
classes: soft-target cross entropy, BCE and focal train on it. Label smoothing is left to
the loss: smoothing is linear, so smoothing the blend equals blending the smoothed
labels, which is what timm's ``mixup_target`` does.

One ``lam`` per batch (timm's ``batch`` mode), drawn from ``Beta(alpha, alpha)``. The
partner is a random permutation of the batch, not timm's reversed batch, so odd and short
last batches mix like any other (timm refuses an odd batch size). Every draw comes from a
host generator seeded by (seed, epoch, batch, rank): nothing is read back from the
device, and a resumed run repeats the mixing of the batch where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from visiontrain.config import DataConfig
from visiontrain.errors import ConfigError

# Tasks whose targets are class labels that can be blended.
MIX_TASKS = ("classification", "multilabel")
_SALT = 0x6D6978  # "mix": a stream apart from the other seeded draws of a batch


@dataclass(frozen=True)
class MixParams:
    """What one batch drew: which method, the blend and, for CutMix, the box."""

    method: str  # "none" | "mixup" | "cutmix"
    lam: float = 1.0
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # y0, y1, x0, x1


class BatchMixer:
    """MixUp / CutMix of a batch: ``(images, targets) -> (mixed images, soft targets)``.

    Args:
        mixup: MixUp's Beta alpha (0: off).
        cutmix: CutMix's Beta alpha (0: off).
        prob: The chance that a batch is mixed at all.
        switch_prob: With both on, the chance that a mixed batch uses CutMix.
        num_classes: Class count (for one-hot targets).
        seed: ``train.seed``.
        rank: This process's rank (each draws its own batches' parameters).
    """

    def __init__(
        self,
        mixup: float,
        cutmix: float,
        prob: float,
        switch_prob: float,
        num_classes: int,
        seed: int,
        rank: int = 0,
    ) -> None:
        self.mixup, self.cutmix = mixup, cutmix
        self.prob, self.switch_prob = prob, switch_prob
        self.num_classes, self.seed, self.rank = num_classes, seed, rank

    def draw(
        self, n: int, height: int, width: int, epoch: int, batch: int
    ) -> tuple[MixParams, np.ndarray]:
        """The batch's parameters and partner permutation, from its own seeded stream."""
        rng = np.random.default_rng([self.seed, epoch, batch, self.rank, _SALT])
        perm = rng.permutation(n)
        if rng.random() >= self.prob:
            return MixParams("none"), perm
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < self.switch_prob)
        if not use_cutmix:
            return MixParams("mixup", float(rng.beta(self.mixup, self.mixup))), perm
        lam = float(rng.beta(self.cutmix, self.cutmix))
        # A box of area (1 - lam) centred anywhere, clipped to the image; lam is then
        # corrected to the area actually kept (timm's correct_lam).
        cut = np.sqrt(1.0 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        y0, y1 = np.clip(cy - ch // 2, 0, height), np.clip(cy + ch // 2, 0, height)
        x0, x1 = np.clip(cx - cw // 2, 0, width), np.clip(cx + cw // 2, 0, width)
        kept = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
        return MixParams("cutmix", kept, (int(y0), int(y1), int(x0), int(x1))), perm

    def __call__(
        self, x: torch.Tensor, target: torch.Tensor, epoch: int, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a float (N, C, H, W) batch; targets become float (N, classes) distributions.

        Args:
            x: The normalised batch on the device.
            target: int64 class indices (N,) or float multi-label rows (N, classes).
            epoch: The epoch (seeds the draw).
            batch: The batch's index in its epoch (seeds the draw).
        """
        soft = (
            target.float()
            if target.is_floating_point()
            else F.one_hot(target, self.num_classes).float()
        )
        params, perm_np = self.draw(x.shape[0], x.shape[2], x.shape[3], epoch, batch)
        if params.method == "none":
            return x, soft
        perm = torch.from_numpy(perm_np).to(x.device, non_blocking=True)
        if params.method == "mixup":
            x = x * params.lam + x[perm] * (1.0 - params.lam)
        else:
            y0, y1, x0, x1 = params.box
            x = x.clone()
            x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        return x, soft * params.lam + soft[perm] * (1.0 - params.lam)


def build_mixer(
    cfg: DataConfig, task: str, num_classes: int, seed: int, rank: int
) -> BatchMixer | None:
    """The run's mixer, or None when ``data.mixup`` and ``data.cutmix`` are both 0.

    Raises:
        ConfigError: mixing asked for a task whose targets cannot be blended.
    """
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    if task not in MIX_TASKS:
        keys = " and ".join(k for k in ("data.mixup", "data.cutmix") if getattr(cfg, k[5:]) > 0)
        raise ConfigError(
            f"{keys}: MixUp and CutMix blend class labels; task {task} has "
            + (
                "boxes, which a blend of two images does not describe"
                if task == "detection"
                else "per-pixel masks"
                if task == "segmentation"
                else "continuous targets, for which a blended image has no true value"
            )
            + ". Remove the key (they serve classification and multilabel)."
        )
    return BatchMixer(
        cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.mix_switch_prob, num_classes, seed, rank
    )
