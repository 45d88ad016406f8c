"""slimkit's zoo: small models, bundled tasks (no download), and trained weights cached per machine.

::

    from slimkit import zoo
    model = zoo.pretrained("digits_cnn")          # trains once (seconds), then loads from the cache
    task = zoo.load_task("digits")
    zoo.evaluate(model, task)                     # {"top1": 0.98, ...}
    net = zoo.create_model("resnet18")            # random weights, for latency / SQNR work
    (x,) = zoo.example_inputs("resnet18", batch=1)

``import slimkit`` does not import the zoo; ``slimkit.zoo`` loads it (and torch) on first use.
"""

from __future__ import annotations

from slimkit.zoo.models import MODELS, create_model, example_inputs, list_models
from slimkit.zoo.tasks import TASKS, Task, evaluate, load_task

# `pretrained` is both a submodule and its main function: bind the function last, so that
# `slimkit.zoo.pretrained(...)` is always callable
from slimkit.zoo.pretrained import (  # isort: skip
    PRETRAINED,
    cache_dir,
    pretrained,
    pretrained_metrics,
)

__all__ = [
    "MODELS",
    "PRETRAINED",
    "TASKS",
    "Task",
    "cache_dir",
    "create_model",
    "evaluate",
    "example_inputs",
    "list_models",
    "load_task",
    "pretrained",
    "pretrained_metrics",
]
