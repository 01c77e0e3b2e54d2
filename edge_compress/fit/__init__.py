"""``fit``: latency-budget compression with the device in the loop (see ``run``)."""

from edge_compress.fit.config import FitConfig
from edge_compress.fit.run import FitError, FitResult, fit

__all__ = ["FitConfig", "FitError", "FitResult", "fit"]
