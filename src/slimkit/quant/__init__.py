"""Quantization: primitives (fake-quant, ranges), calibration, and one file per method.

``from slimkit.quant import PTQ`` gives the config of static post-training int8 quantization.
"""

from slimkit.quant.ptq import PTQ

__all__ = ["PTQ"]
