"""The detector zoo: YOLO-tiny, PP-PicoDet style and SSDLite families.

Names are imported lazily, so ``edge_compress.models.postprocess`` (NumPy only,
the shared decode + NMS) loads on a device without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Detector": "base", "InputSpec": "base",
    "Detections": "postprocess", "PostProcessConfig": "postprocess",
    "create_detector": "registry", "list_detectors": "registry", "zoo_entry": "registry",
    "ModelSummary": "summary", "summarize": "summary",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from edge_compress.models.base import Detector, InputSpec
    from edge_compress.models.postprocess import Detections, PostProcessConfig
    from edge_compress.models.registry import create_detector, list_detectors, zoo_entry
    from edge_compress.models.summary import ModelSummary, summarize


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edge_compress.models' has no attribute '{name}'")
    return getattr(importlib.import_module(f"edge_compress.models.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
