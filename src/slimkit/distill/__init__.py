"""Knowledge distillation: losses that fit the model's output (response, feature, relation) and
student builders. The package is also the verb, for every registered ``distill.*`` method::

    s = sk.distill(student, teacher, "response", data=train, epochs=3)
    s = sk.distill(student, teacher, sk.distill.Response(temperature=4), data=train)
    small = sk.distill.student(teacher, depth=0.5, macs=0.5, example_inputs=(x,))  # a student
"""

from __future__ import annotations

from typing import Any

from torch import nn

from slimkit.core.config import Config
from slimkit.core.verbs import dispatch, make_callable
from slimkit.distill.losses import Decision, detect
from slimkit.distill.methods import DistillReport, Feature, Relation, Response
from slimkit.distill.students import student
from slimkit.errors import ConfigError

__all__ = [
    "Decision",
    "DistillReport",
    "Feature",
    "Relation",
    "Response",
    "detect",
    "distill",
    "student",
]


def distill(
    student: nn.Module,
    teacher: nn.Module,
    config: str | Config = "response",
    *,
    data: Any = None,
    **options: Any,
) -> nn.Module:
    """A copy of ``student`` trained to match ``teacher`` on ``data`` (neither is modified).

    ``config`` is a registered ``distill.*`` name or config object; ``options`` are the config's
    fields (``epochs``, ``lr``, ``alpha``, ...) or the method's own keywords (``checkpoint``,
    ``val_fn``, ``inplace``, ...). ``sk.report(result)`` says what loss was
    used and how training went."""
    if not isinstance(teacher, nn.Module):
        raise ConfigError(
            f"sk.distill needs the teacher model second, got {type(teacher).__name__}",
            fix="call sk.distill(student, teacher, method, data=...)",
        )
    return dispatch("distill", student, config, data=data, teacher=teacher, **options)


make_callable(__name__, "slimkit.distill:distill")
