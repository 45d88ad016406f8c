"""Quantization: primitives (fake-quant, ranges) and, per file, the methods built on them."""
