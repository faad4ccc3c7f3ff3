"""TensorBoard scalars, the config as text, and hparams with the final metrics."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from visiontrain.engine.callbacks import Callback

if TYPE_CHECKING:
    from visiontrain.engine.trainer import Trainer

_SKIP = {"step", "epoch", "split", "hparams", "time", "confusion_matrix", "kind"}


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """Flatten a record into TensorBoard tags: ``val/accuracy``, ``val/recall/defect``."""
    split = record.get("split", "train")
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in _SKIP:
            continue
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out[f"{split}/{key}"] = float(value)
        elif key == "per_class" and isinstance(value, dict):
            for cls, stats in value.items():
                for metric, v in stats.items():
                    if metric != "support":
                        out[f"{split}/{metric}/{cls}"] = float(v)
    return out


class TensorBoardLogger(Callback):
    """Writes scalars under ``tb/``."""

    name = "tensorboard"

    def __init__(self, folder: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events from an interrupted run past the resumed checkpoint.
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def on_fit_start(self, trainer: Trainer) -> None:  # noqa: D102
        text = trainer.cfg.to_yaml().replace("\n", "\n    ")
        self.writer.add_text("config", "    " + text, trainer.global_step)

    def on_update(self, trainer: Trainer) -> None:  # noqa: D102
        # The LR in force at every update (a host float: no device sync).
        self.writer.add_scalar("train/lr", trainer.last_lr, trainer.global_step)
        for name, lr in (trainer.last_lrs or {}).items():
            self.writer.add_scalar(f"train/lr/{name}", lr, trainer.global_step)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:  # noqa: D102
        if record.get("split") == "train":
            record = {k: v for k, v in record.items() if k != "lr"}  # logged per update
        if record.get("kind") == "train_epoch":
            prefix = {"train/loss": "train/epoch_loss"}
            values = {prefix.get(k, k): v for k, v in scalars(record).items()}
        else:
            values = scalars(record)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, record["step"])

    def on_fit_end(self, trainer: Trainer) -> None:  # noqa: D102
        final = {f"hparam/{k}": v for k, v in trainer.final_scalars().items()}
        if final:
            self.writer.add_hparams(trainer.hparams(), final, run_name="hparams")
        self.close()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
