"""Quantization: primitives (fake-quant, ranges), calibration, and one file per method.

``from slimkit.quant import PTQ, QAT, Dynamic, WeightOnly, Half, Int4, LowBit`` gives the method
configs (``LowBit``: experimental binary / ternary / pow2 / k-means weights);
``slimkit.quant.quantize`` (``sk.quantize``) is the verb that runs any of them by name or config;
``slimkit.quant.diagnose`` splits a quantized model's output error into weights and activations.
"""

from slimkit.quant.diagnose import QuantDiagnosis, diagnose
from slimkit.quant.dynamic import Dynamic
from slimkit.quant.half import Half
from slimkit.quant.int4 import Int4
from slimkit.quant.mixed import Mixed
from slimkit.quant.nonuniform import LowBit
from slimkit.quant.ptq import PTQ
from slimkit.quant.qat import QAT
from slimkit.quant.verb import quantize
from slimkit.quant.weight_only import WeightOnly

__all__ = [
    "PTQ", "QAT", "Dynamic", "Half", "Int4", "LowBit", "Mixed", "QuantDiagnosis", "WeightOnly",
    "diagnose", "quantize",
]  # fmt: skip
