"""Datasets: a COCO-format loader, a synthetic COCO-format generator, transforms.

Names are imported lazily, so ``edge_compress.data.transforms`` (NumPy + PIL, the
inference preprocess) and ``edge_compress.data.synth`` load without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CocoDataset": "coco", "collate": "coco", "read_rgb": "coco",
    "CLASS_NAMES": "synth", "SynthPaths": "synth", "generate_synthetic": "synth", "render_image": "synth",
    "AugmentConfig": "transforms", "augment": "transforms", "letterbox": "transforms",
    "letterbox_boxes": "transforms", "unletterbox_boxes": "transforms",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from edge_compress.data.coco import CocoDataset, collate, read_rgb
    from edge_compress.data.synth import CLASS_NAMES, SynthPaths, generate_synthetic, render_image
    from edge_compress.data.transforms import (AugmentConfig, augment, letterbox, letterbox_boxes,
                                               unletterbox_boxes)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edge_compress.data' has no attribute '{name}'")
    return getattr(importlib.import_module(f"edge_compress.data.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
