"""``lower``: an fp32 ONNX detector + a per-layer kernel choice -> a ``LoweredGraph`` for the numba kernels."""

from edge_compress.lower.config import CHOICES, LoweringConfig
from edge_compress.lower.lower import lower

__all__ = ["CHOICES", "LoweringConfig", "lower"]
