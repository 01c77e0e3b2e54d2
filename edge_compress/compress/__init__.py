"""Compression methods of the survey applied to the zoo detectors (issue 5).

One verb per method, driven by a frozen config: ``prune_unstructured(model,
SparsityConfig(...))`` (magnitude / LAMP / N:M masks) and ``decompose(model,
LowRankConfig(...))`` (SVD / Tucker-2). Names are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SparsityConfig": "sparsity", "SparsityReport": "sparsity", "prune_unstructured": "sparsity",
    "masks": "sparsity", "remove_masks": "sparsity",
    "LowRankConfig": "lowrank", "LowRankReport": "lowrank", "decompose": "lowrank",
    "DistillConfig": "distill", "distillation_loss": "distill",
    "Recipe": "recipe", "CompressResult": "recipe", "compress": "recipe", "load_recipe": "recipe",
    "save_compressed": "checkpoint", "load_compressed": "checkpoint",
    "SensitivityConfig": "sensitivity",   # the verb: edge_compress.compress.sensitivity.sensitivity (a name
    # exported here would be shadowed by the submodule of the same name once it is imported)
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'edge_compress.compress' has no attribute '{name}'")
    return getattr(importlib.import_module(f"edge_compress.compress.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return __all__
