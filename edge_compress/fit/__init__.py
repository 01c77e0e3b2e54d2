"""``fit``: latency-budget compression with the device in the loop (see ``run``).

``fit``, ``FitError`` and ``FitResult`` load on first use: the measuring process
(``executor``) imports ``edge_compress.fit.measure`` and must not pull in torch
and the compression code with this package.
"""

from edge_compress.fit.config import FitConfig

__all__ = ["FitConfig", "FitError", "FitResult", "fit"]


def __getattr__(name: str):
    if name in ("fit", "FitError", "FitResult"):
        from edge_compress.fit import run

        return getattr(run, name)
    raise AttributeError(f"module 'edge_compress.fit' has no attribute {name!r}")
