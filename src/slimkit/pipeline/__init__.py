"""The pipeline: recipes (YAML <-> step configs), the runner that applies them, artifacts, and
the before/after measurements every command reports.

::

    import slimkit as sk
    result = sk.run("recipes/digits_prune_quant.yaml", out="artifact/")
    recipe = sk.pipeline.Recipe.load("artifact/recipe.yaml")   # the run, every choice pinned

``slimkit run recipe.yaml --out DIR`` is the same call on the command line; ``slimkit quantize``,
``prune`` and ``export`` build a one-step recipe from their options and run it here.
"""

from slimkit.pipeline.artifact import load, write_artifact
from slimkit.pipeline.recipe import Export, Finetune, Recipe, ScopeSpec, Step
from slimkit.pipeline.runner import RunResult, StepRecord, run

__all__ = [
    "Export",
    "Finetune",
    "Recipe",
    "RunResult",
    "ScopeSpec",
    "Step",
    "StepRecord",
    "load",
    "run",
    "write_artifact",
]
