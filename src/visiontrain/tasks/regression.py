"""Image regression: one or more scalar targets per image; MAE, RMSE and R² per target.

The model predicts standardised targets (zero mean, unit spread on the training set), so
that the default learning rate suits any unit; predictions and metrics are in the data's
own units. A loss that needs raw units (``msle``) gets de-standardised outputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from visiontrain.config import Config
from visiontrain.data.sources import DataBundle
from visiontrain.engine.distributed import Dist
from visiontrain.errors import ConfigError, DataError
from visiontrain.losses import LossContext, build_loss
from visiontrain.tasks.base import Task, register_task
from visiontrain.tasks.thresholds import fixed_or_auto

METRICS = ("mae", "rmse", "r2")


@register_task("regression")
class RegressionTask(Task):
    """Scalar targets per image, named by the data source."""

    name = "regression"

    @staticmethod
    def predictions(  # noqa: D102
        outputs: list[torch.Tensor], task_state: dict[str, Any], names: list[str], top_k: int
    ) -> list[dict[str, Any]]:
        mean = torch.tensor(task_state["target_mean"])
        std = torch.tensor(task_state["target_std"])
        values = torch.stack(outputs).float().cpu() * std + mean
        return [
            {name: round(float(v), 6) for name, v in zip(names, row, strict=True)} for row in values
        ]

    def __init__(self, cfg: Config, bundle: DataBundle, device: torch.device) -> None:
        super().__init__(cfg, bundle, device)
        if not bundle.target_names:
            raise ConfigError(
                f"task=regression needs data with numeric targets; {cfg.data.name} gives classes."
            )
        if not fixed_or_auto(cfg.train.threshold):
            raise ConfigError(
                "train.threshold applies to binary classification; task=regression predicts "
                "values. Remove train.threshold."
            )
        labels = np.asarray(bundle.train.labels, dtype=np.float64)
        n_targets = len(bundle.target_names)
        self.loss_fn = build_loss(cfg.loss, LossContext("regression", n_targets, None))
        if self.loss_fn.raw_targets and labels.min() < 0:
            raise DataError(
                f"loss {self.loss_fn.name} takes log(1 + target) and needs targets >= 0; the "
                f"training targets go down to {labels.min():.4g}. Use loss.name=mse or huber."
            )
        mean, std = labels.mean(axis=0), labels.std(axis=0)
        # A constant target would divide by zero; it is then only shifted.
        std = np.where(std > 1e-12, std, 1.0)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        # Float64 sums: SST of large targets loses precision in float32.
        self._sums = torch.zeros(5, n_targets, dtype=torch.float64, device=device)
        self._loss_sum = torch.zeros((), device=device)
        self._count = torch.zeros((), device=device, dtype=torch.long)

    def _loss_value(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss_fn.raw_targets:
            return self.loss_fn(self.denormalize(output), target)
        return self.loss_fn(output.float(), (target - self.mean) / self.std)

    def denormalize(self, output: torch.Tensor) -> torch.Tensor:
        """Model outputs in the targets' own units."""
        return output.float() * self.std + self.mean

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:  # noqa: D102
        return {"loss": self._loss_value(output, target)}

    def reset_metrics(self) -> None:  # noqa: D102
        self._sums.zero_()
        self._loss_sum.zero_()
        self._count.zero_()

    def update_metrics(self, output: torch.Tensor, target: torch.Tensor) -> None:  # noqa: D102
        self._loss_sum += self._loss_value(output, target).detach() * target.shape[0]
        self._count += target.shape[0]
        pred = self.denormalize(output).double()
        y = target.double()
        err = pred - y
        stacked = torch.stack(
            [err.abs().sum(0), (err**2).sum(0), y.sum(0), (y**2).sum(0), err.sum(0)]
        )
        self._sums += stacked

    def sync_metrics(self, dist: Dist) -> None:  # noqa: D102
        dist.sum_(self._loss_sum)
        dist.sum_(self._count)
        dist.sum_(self._sums)

    def compute_metrics(self) -> dict[str, Any]:  # noqa: D102
        count = int(self._count)
        n = max(count, 1)
        abs_err, sq_err, y_sum, y_sq, err_sum = self._sums.cpu()
        mae = abs_err / n
        rmse = (sq_err / n).sqrt()
        sst = y_sq - y_sum**2 / n
        # R² is undefined for a constant target (sst = 0): reported as NaN, as sklearn warns.
        r2 = torch.where(sst > 1e-12, 1 - sq_err / sst.clamp(min=1e-12), torch.nan)
        per_target = {
            name: {
                "mae": float(mae[i]),
                "rmse": float(rmse[i]),
                "r2": float(r2[i]),
                "bias": float(err_sum[i] / n),
            }
            for i, name in enumerate(self.bundle.target_names)
        }
        return {
            "loss": float(self._loss_sum) / n,
            "mae": float(mae.mean()),
            "rmse": float(rmse.mean()),
            "r2": float(r2.mean()),
            "per_target": per_target,
            "samples": count,
        }

    def metric_names(self) -> list[str]:  # noqa: D102
        names = ["val/loss", *(f"val/{m}" for m in METRICS)]
        for target in self.bundle.target_names:
            names += [f"val/{m}/{target}" for m in METRICS]
        return names

    def describe(self) -> list[str]:  # noqa: D102
        parts = ", ".join(
            f"{t} mean {float(m):.4g} std {float(s):.4g}"
            for t, m, s in zip(self.bundle.target_names, self.mean, self.std, strict=True)
        )
        return [f"regression targets (train): {parts}; loss {self.loss_fn.name}"]

    def summary_info(self) -> dict[str, Any]:  # noqa: D102
        return {
            "target_names": self.bundle.target_names,
            "target_mean": self.mean.tolist(),
            "target_std": self.std.tolist(),
            "loss": {"name": self.loss_fn.name, **self.loss_fn.info},
        }

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"target_mean": self.mean.tolist(), "target_std": self.std.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        if "target_mean" in state:
            self.mean = torch.tensor(state["target_mean"], device=self.device)
            self.std = torch.tensor(state["target_std"], device=self.device)
