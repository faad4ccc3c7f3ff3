"""``visiontrain doctor``: a preflight of a config's data, model and training step.

Each check is a function registered with :func:`register_check`; it receives a shared
:class:`DoctorContext` (config, built parts, console, cached data scan) and returns
:class:`Finding` objects, each with a level (ok | warning | error), numbers as evidence
and a fix. Checks run in registration order; one that raises becomes an error finding
naming the exception, and the others still run. Every check that runs or trains the model
works on a deep copy, so ``parts.model`` leaves the doctor exactly as it came in.

The checks follow the usual "recipe for training neural networks" order: look at the data
(balance, duplicates/leakage, unreadable files, sizes), then the model at init, then
whether one batch can be overfit, the gradients, the learning rate, the evaluation path,
the input pipeline's speed and mixed precision.
"""

from __future__ import annotations

# The check modules register themselves, in this order: the order the checks run in.
# isort: off
from visiontrain.tools.doctor import data  # noqa: F401
from visiontrain.tools.doctor import augment  # noqa: F401
from visiontrain.tools.doctor import model  # noqa: F401
from visiontrain.tools.doctor import train  # noqa: F401
from visiontrain.tools.doctor import evaluation  # noqa: F401
from visiontrain.tools.doctor import pipeline  # noqa: F401

# isort: on
from visiontrain.tools.doctor.base import (
    _CHECKS,
    DoctorContext,
    Finding,
    list_checks,
    register_check,
)
from visiontrain.tools.doctor.runner import add_parser, cmd_doctor, run_doctor

__all__ = [
    "_CHECKS",
    "DoctorContext",
    "Finding",
    "add_parser",
    "cmd_doctor",
    "list_checks",
    "register_check",
    "run_doctor",
]
