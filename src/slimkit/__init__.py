"""slimkit: make trained PyTorch models smaller and faster to deploy, with a measured loss of
accuracy.

The public verbs are loaded lazily, so ``import slimkit`` stays cheap (it imports neither torch's
ONNX stack, onnxruntime, matplotlib nor optuna until a feature needs them)::

    import slimkit as sk
    model = sk.zoo.pretrained("digits_cnn")
    report = sk.export_onnx(model, "digits.onnx", example_inputs=x)   # checks ORT parity
    q = sk.quantize(model, "int8", data=calib)       # any method: a registered name or a config
    print(sk.report(q).summary())                    # what it did, the same for every verb
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> "module:attribute" (or "module" for a subpackage), imported on first use
_LAZY = {
    "analyze": "slimkit.analyze",  # callable package: sk.analyze(model, x)
    "export_onnx": "slimkit.export.onnx:export_onnx",
    "deploy": "slimkit.export.backends.measure:deploy",  # sk.deploy(model, x, backend="auto")
    "fold_bn": "slimkit.graph_opt.bn_fold:fold_bn",
    "optimize": "slimkit.graph_opt:optimize",  # BN folding, constant folding, fusion
    "quantize": "slimkit.quant.verb:quantize",  # every quant.* method, by name or config
    "prune": "slimkit.prune",  # callable package: sk.prune(model, sk.prune.Channel(...))
    "report": "slimkit.report",  # callable package: sk.report(result), what any verb did
    "report_html": "slimkit.report.html:report_html",  # sk.report_html(artifact_dir) -> Path
    "quant": "slimkit.quant",
    "decompose": "slimkit.lowrank:decompose",  # sk.decompose(model, "svd", ...)
    "lowrank": "slimkit.lowrank",
    "distill": "slimkit.distill",  # callable package: sk.distill(student, teacher, config, ...)
    "lighten": "slimkit.lightweight:lighten",  # sk.lighten(model, "separable", data=..., ...)
    "lightweight": "slimkit.lightweight",
    "dynamic": "slimkit.dynamic",  # early exit, skip gates: sk.dynamic.early_exit(model, ...)
    "nas": "slimkit.nas",  # architecture search: sk.nas.search_arch("shapes", latency_ms=0.1)
    "measure_latency": "slimkit.analyze.latency:measure_latency",
    "load": "slimkit.core.artifacts:load",
    "run": "slimkit.pipeline.runner:run",  # sk.run("recipe.yaml", model=..., data=..., out=...)
    "compress": "slimkit.search.compress:compress",  # sk.compress(model, sk.Constraints(...))
    "Constraints": "slimkit.search.constraints:Constraints",
    "search": "slimkit.search",
    "Scope": "slimkit.core.scope:Scope",
    "zoo": "slimkit.zoo",
    "errors": "slimkit.errors",
}

if TYPE_CHECKING:  # pragma: no cover
    from slimkit import analyze, errors, prune, quant, zoo
    from slimkit.analyze.latency import measure_latency
    from slimkit.core.artifacts import load
    from slimkit.core.scope import Scope
    from slimkit.core.verbs import report
    from slimkit.export.backends.measure import deploy
    from slimkit.export.onnx import export_onnx
    from slimkit.graph_opt import optimize
    from slimkit.graph_opt.bn_fold import fold_bn
    from slimkit.quant.verb import quantize
    from slimkit.report.html import report_html
    from slimkit.search.compress import compress
    from slimkit.search.constraints import Constraints


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module 'slimkit' has no attribute {name!r}")
    mod_name, _, attr = target.partition(":")
    mod = importlib.import_module(mod_name)
    value = getattr(mod, attr) if attr else mod
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "__version__",
    "Constraints",
    "Scope",
    "analyze",
    "compress",
    "errors",
    "deploy",
    "export_onnx",
    "fold_bn",
    "optimize",
    "quant",
    "quantize",
    "prune",
    "report",
    "report_html",
    "measure_latency",
    "load",
    "zoo",
]
