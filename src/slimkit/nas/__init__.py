"""Hardware-aware architecture search: a search space as data, a latency model measured on ONNX
Runtime (or the roofline of a hardware profile), a weight-sharing supernet and NSGA-II / random /
REINFORCE / differentiable (DARTS) search, the chosen network extracted as a plain module and
fine-tuned::

    import slimkit as sk
    res = sk.nas.search_arch("shapes", latency_ms=0.08, trials=60)
    res.save("nas_out/"); net = sk.nas.load("nas_out/")

See ``docs/techniques/nas.md``.
"""

from __future__ import annotations

from slimkit.nas.api import NASResult, calibrated_table, finetune, load, search_arch
from slimkit.nas.darts import Darts, darts_search
from slimkit.nas.latency import LatencyTable, Validation, measure_archs, roofline_ms, validate
from slimkit.nas.model import ArchNet
from slimkit.nas.search import Candidate, Evaluator, SearchResult, search, seed_archs
from slimkit.nas.space import Arch, CNNSpace, EncoderSpace, Stage, StageSpace
from slimkit.nas.supernet import SuperNet, recalibrate_bn, sandwich_loss, train_supernet

__all__ = [
    "Arch",
    "ArchNet",
    "CNNSpace",
    "Candidate",
    "Darts",
    "EncoderSpace",
    "Evaluator",
    "LatencyTable",
    "NASResult",
    "SearchResult",
    "Stage",
    "StageSpace",
    "SuperNet",
    "Validation",
    "calibrated_table",
    "darts_search",
    "finetune",
    "load",
    "measure_archs",
    "recalibrate_bn",
    "roofline_ms",
    "sandwich_loss",
    "search",
    "search_arch",
    "seed_archs",
    "train_supernet",
    "validate",
]
