"""Checkpoints: atomic save, and rebuilding a zoo detector from one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edge_compress.errors import ConfigError
from edge_compress.io import atomic_path

CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        torch.save({"version": CHECKPOINT_VERSION, **state}, tmp)


def read_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint '{path}' does not exist; pass the .pt file written by "
                          "`edge-compress train` (runs/<name>/best.pt or last.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"checkpoint '{path}' could not be read ({type(e).__name__}: {e}); "
                          "is it a file written by `edge-compress train`?") from e
    if not isinstance(ckpt, dict) or "model_config" not in ckpt:
        raise ConfigError(f"checkpoint '{path}' has no 'model_config'; it was not written by edge-compress")
    return ckpt


def build_from_config(model_config: dict[str, Any]):
    """Rebuild a zoo detector from ``Detector.config()``."""
    from edge_compress.models import create_detector

    build = dict(model_config.get("build", {}))
    build["class_names"] = tuple(model_config["class_names"])
    build.pop("num_classes", None)
    return create_detector(model_config["name"], **build)


def load_detector(path: str | Path, use_ema: bool = True):
    """A detector with the checkpoint's weights (the EMA weights when present). A compressed
    checkpoint (``edge_compress.compress.checkpoint``) is rebuilt from its steps' plans."""
    ckpt = read_checkpoint(path)
    if ckpt.get("kind") == "edge_compress.compressed":
        from edge_compress.compress.checkpoint import rebuild

        return rebuild(ckpt, str(path))
    model = build_from_config(ckpt["model_config"])
    if ckpt.get("compression_steps"):   # a fine-tune of a compressed model: rebuild its structure first
        from edge_compress.compress.checkpoint import restructure_steps

        restructure_steps(model, ckpt["compression_steps"])
    state = ckpt.get("ema", {}).get("module") if use_ema and ckpt.get("ema") else None
    model.load_state_dict(state if state is not None else ckpt["model"])
    return model.eval()
