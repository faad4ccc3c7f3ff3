"""The shared :class:`~visiontrain.registry.Registry` and every registry built on it."""

from collections.abc import Callable

import pytest
import torch
from torch import nn

from visiontrain.config import DataConfig, LossConfig, OptimConfig, ScheduleConfig
from visiontrain.data.sources import build_data
from visiontrain.engine.optim import build_optimizer
from visiontrain.engine.schedules import Horizon, build_schedule
from visiontrain.errors import ConfigError, DataError
from visiontrain.losses import LossContext, build_loss
from visiontrain.models import create_model
from visiontrain.registry import Registry
from visiontrain.report import sections
from visiontrain.tasks.base import task_class


def _schedules() -> Registry[int]:
    reg: Registry[int] = Registry("schedule", key="schedule.name")
    reg.register("cosine", 1)
    reg.register("step", 2)
    reg.register("plateau", 3)
    return reg


def test_duplicate_name_raises_value_error() -> None:
    reg = _schedules()
    with pytest.raises(ValueError, match="schedule 'step' is already registered"):
        reg.register("step", 4)
    with pytest.raises(ValueError, match="already registered"):
        reg.decorator("cosine")(lambda: None)
    assert reg.get("step") == 2  # the first registration stands


def test_unknown_name_names_the_key_and_suggests_the_nearest() -> None:
    with pytest.raises(ConfigError) as err:
        _schedules().get("cosin")
    assert str(err.value) == (
        "unknown schedule `schedule.name=cosin` — did you mean `cosine`? "
        "Choose one of: cosine, plateau, step."
    )


def test_unknown_name_without_a_close_match_only_lists() -> None:
    with pytest.raises(ConfigError, match=r"`schedule\.name=zzz`\. Choose one of: cosine"):
        _schedules().get("zzz")


def test_error_class_narrowed_choices_and_tail() -> None:
    reg: Registry[int] = Registry("data source", key="data.name", error=DataError)
    reg.register("digits", 1)
    reg.register("mnist", 2)
    with pytest.raises(DataError, match="did you mean `digits`"):
        reg.get("digitz")
    err = reg.unknown("mnistt", among=["digits"], kind="tiny source", tail="Pick digits.")
    assert str(err) == "unknown tiny source `data.name=mnistt`. Pick digits."


def test_container_protocol_decorator_and_override() -> None:
    reg = _schedules()
    assert reg.names() == ["cosine", "plateau", "step"]
    assert list(reg) == ["cosine", "step", "plateau"]  # registration order
    assert len(reg) == 3 and "step" in reg and "nope" not in reg
    assert reg.find("nope") is None

    fns: Registry[Callable[[], int]] = Registry("check")

    @fns.decorator("one")
    def one() -> int:
        return 1

    assert one() == 1 and fns.get("one") is one
    with fns.override("one", lambda: 2):
        assert fns.get("one")() == 2
    assert fns.get("one") is one
    with fns.override("two", lambda: 2):
        assert "two" in fns
    assert "two" not in fns


def _model() -> None:
    create_model("simple_cn", num_classes=2, in_chans=3)


def _dense_model() -> None:
    create_model("fcos_tin", num_classes=2, in_chans=3, task="detection", image_size=64)


def _source() -> None:
    build_data(DataConfig(name="digitz"))


def _loss() -> None:
    build_loss(LossConfig(name="focla"), LossContext("classification", 2, torch.tensor([5, 5])))


def _schedule() -> None:
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    build_schedule(opt, ScheduleConfig(name="cosin"), OptimConfig(), Horizon(2, 3))


def _optimizer() -> None:
    build_optimizer(OptimConfig(name="adamx"), nn.Linear(2, 2))


def _task() -> None:
    task_class("regresion")


def _section() -> None:
    # task_plots skips a task without a section on purpose, so the registry is asked
    # directly; importing the report modules registers the sections.
    from visiontrain.report import classification  # noqa: F401

    sections._SECTIONS.get("classifcation")


@pytest.mark.parametrize(
    ("call", "fragments"),
    [
        (_model, ("unknown model `model.name=simple_cn`", "did you mean `simple_cnn`")),
        (_dense_model, ("unknown detection model `model.name=fcos_tin`", "`fcos_tiny`")),
        (_source, ("unknown data source `data.name=digitz`", "did you mean `digits`")),
        (_loss, ("unknown loss `loss.name=focla`", "did you mean `focal`")),
        (_schedule, ("unknown schedule `schedule.name=cosin`", "did you mean `cosine`")),
        (_optimizer, ("unknown optimizer `optim.name=adamx`", "did you mean `adam")),
        (_task, ("unknown task `task=regresion`", "did you mean `regression`")),
        (_section, ("unknown report section `classifcation`", "`classification`")),
    ],
    ids=["model", "dense_model", "source", "loss", "schedule", "optimizer", "task", "section"],
)
def test_every_registry_suggests_the_nearest_name(
    call: Callable[[], None], fragments: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as err:
        call()
    for fragment in fragments:
        assert fragment in str(err.value)
    assert "Traceback" not in str(err.value)
