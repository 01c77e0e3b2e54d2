"""Compression methods of the survey applied to the zoo detectors (issue 5).

One verb per method, driven by a frozen config, changing the detector in place
and returning a report whose ``plan`` rebuilds the structure (``restructure``):
``prune_channels`` (structured, coupled channel groups from ``depgraph``),
``drop_layers``, ``prune_unstructured`` (magnitude / LAMP / N:M masks),
``prepare_qat``, ``binarize``, ``ternarize``, ``cluster_weights`` (k-means) and
``decompose`` (SVD / Tucker-2). ``compress(model, Recipe)`` chains them with
fine-tunes and distillation. Names are imported lazily.
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
    "ChannelPruneConfig": "structured", "ChannelPruneReport": "structured", "prune_channels": "structured",
    "bn_l1_penalty": "structured", "channel_groups": "depgraph",
    "LayerDropConfig": "layerdrop", "LayerDropReport": "layerdrop", "drop_layers": "layerdrop",
    "removable_blocks": "layerdrop",
    "QATConfig": "qat", "QATReport": "qat", "prepare_qat": "qat", "convert_qat": "qat", "qat_calibration": "qat",
    "BinaryConfig": "binary", "BinaryReport": "binary", "binarize": "binary",
    "TernaryConfig": "ternary", "TernaryReport": "ternary", "ternarize": "ternary",
    "KMeansConfig": "kmeans", "KMeansReport": "kmeans", "cluster_weights": "kmeans",
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
