"""The run shared by the commands that compress and may fine-tune (``prune``, ``decompose``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimkit.cli._ui import stages


def run_then_finetune(
    step: Any,
    *,
    model: str,
    rm: Any,
    out: Path,
    finetune_epochs: int,
    weights: Path | None,
    shape: tuple[int, ...] | None,
    data: str | None,
    json_out: bool,
) -> tuple[Any, dict[str, float]]:
    """Run ``step`` (then ``finetune_epochs`` of fine-tuning on the zoo task, distilled from the
    source) as a recipe into ``out``. Returns the run and the test metrics of the compressed
    model before fine-tuning (empty without fine-tuning): the one-shot result."""
    from torch import nn

    from slimkit.pipeline.recipe import Finetune, Recipe, Step
    from slimkit.pipeline.runner import StepRecord, run

    steps = [step]
    if finetune_epochs:
        steps.append(Step("finetune", Finetune(epochs=finetune_epochs, lr=1e-3, batch_size=64)))
    recipe = Recipe.for_model(model, weights=weights, input_shape=shape, data=data,
                              steps=tuple(steps))  # fmt: skip
    oneshot: dict[str, float] = {}

    def before_finetuning(record: StepRecord, compressed: nn.Module) -> None:
        if finetune_epochs and record.name == step.name:
            from slimkit.zoo import evaluate, load_task

            oneshot.update(evaluate(compressed, load_task(str(rm.task))))

    with stages(not json_out) as stage:
        res = run(recipe, model=rm, out=out, progress=not json_out, on_step=before_finetuning,
                  on_event=stage)  # fmt: skip
    return res, oneshot
