"""Backends: one module per runtime, behind the protocol in ``base``.

``list_backends()`` names them; ``get_backend(name)`` returns one and, unless
told otherwise, checks that its runtime is installed here.
"""

from __future__ import annotations

import importlib

from edge_compress.backends.base import Backend, ExportSource, LayerTiming, Runner
from edge_compress.errors import BackendUnavailableError, UnknownNameError

# name -> (module under edge_compress.backends, class); modules load on first use.
_BACKENDS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("ort", "OnnxRuntimeBackend"),
    "openvino": ("ov", "OpenVinoBackend"),
    "litert": ("litert", "LiteRtBackend"),
    "tensorrt": ("tensorrt", "TensorRtBackend"),
    "kernels": ("kernels", "KernelsBackend"),
}

__all__ = ["Backend", "ExportSource", "LayerTiming", "Runner", "get_backend", "list_backends"]


def list_backends() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str, require_available: bool = True) -> Backend:
    """The backend called ``name``; raises when it is unknown or (by default) not installed."""
    if name not in _BACKENDS:
        raise UnknownNameError(f"unknown backend '{name}'; choose one of: {', '.join(list_backends())}")
    module, cls = _BACKENDS[name]
    backend = getattr(importlib.import_module(f"edge_compress.backends.{module}"), cls)()
    if require_available:
        ok, reason = backend.available()
        if not ok:
            raise BackendUnavailableError(f"backend '{name}' is not available here: {reason}")
    return backend
