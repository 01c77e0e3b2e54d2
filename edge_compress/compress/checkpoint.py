"""Compressed checkpoints: a detector's config, the compression steps applied to it, its weights.

A compressed detector is no longer the zoo module its config builds: layers are masked
(parametrize), replaced by low-rank chains, sliced to fewer channels, wrapped by
quantizers. So the file stores, besides ``model.config()`` and the ``state_dict``, the
ordered list of steps (method name, config dict, structural ``plan``), and loading
replays each method's ``restructure(model, plan)`` on a fresh detector before
``load_state_dict(strict=True)``: the structure comes from the plans, every number from
the state_dict, and no data is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_compress.errors import ArtifactError, ConfigError
from edge_compress.io import atomic_path

COMPRESSED_VERSION = 1
KIND = "edge_compress.compressed"


@dataclass(frozen=True)
class AppliedStep:
    """One applied compression step: the registry ``method`` name, its config and its report's plan."""

    method: str
    config: dict[str, Any]
    plan: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "config": dict(self.config), "plan": dict(self.plan)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AppliedStep":
        missing = {"method", "config", "plan"} - set(d)
        if missing:
            raise ConfigError(f"compressed checkpoint step {d!r} lacks {sorted(missing)}")
        return cls(str(d["method"]), dict(d["config"]), dict(d["plan"]))


def _as_step(step: AppliedStep | dict[str, Any]) -> AppliedStep:
    return step if isinstance(step, AppliedStep) else AppliedStep.from_dict(step)


def save_compressed(path: str | Path, model: nn.Module, steps: list[AppliedStep | dict[str, Any]],
                    overwrite: bool = False, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (config + steps + state_dict) to ``path`` atomically (temp file + rename).
    An existing file is an error unless ``overwrite``. ``extra`` adds JSON-able metadata (e.g. metrics)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise ArtifactError(f"{path} already exists; choose another path or pass overwrite=True "
                            "(compressed checkpoints are never overwritten silently)")
    steps = [_as_step(s).to_dict() for s in steps]
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"version": COMPRESSED_VERSION, "kind": KIND, "model_config": model.config(),
                    "compression_steps": steps, "model": state, "extra": dict(extra or {})}, tmp)
    return path


def is_compressed(ckpt: dict[str, Any]) -> bool:
    """True for a checkpoint dict written by :func:`save_compressed`."""
    return isinstance(ckpt, dict) and ckpt.get("kind") == KIND


def restructure_steps(model: nn.Module, steps: list[AppliedStep | dict[str, Any]]) -> nn.Module:
    """Replay each step's ``restructure(model, plan)`` in order on ``model`` (in place)."""
    from edge_compress.compress.recipe import method_entry

    steps = [_as_step(s) for s in steps]
    for i, step in enumerate(steps):
        try:
            method_entry(step.method).restructure()(model, step.plan)
        except ConfigError as e:
            raise ConfigError(f"compressed checkpoint step {i} ({step.method}): {e}") from e
    model.compression_steps = [s.to_dict() for s in steps]   # carried into later checkpoints of this model
    return model


def rebuild(ckpt: dict[str, Any], source: str = "checkpoint") -> nn.Module:
    """The compressed detector of a loaded checkpoint dict: fresh detector, restructure, strict load."""
    from edge_compress.train.checkpoint import build_from_config

    if ckpt.get("version") != COMPRESSED_VERSION:
        raise ArtifactError(f"{source}: compressed checkpoint version {ckpt.get('version')} is not supported "
                            f"(this edge-compress reads version {COMPRESSED_VERSION})")
    model = build_from_config(ckpt["model_config"])
    restructure_steps(model, ckpt["compression_steps"])
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise ArtifactError(f"{source}: the weights do not fit the structure rebuilt from its steps "
                            f"({[s['method'] for s in ckpt['compression_steps']]}): {e}") from e
    return model.eval()


def load_compressed(path: str | Path) -> nn.Module:
    """Rebuild the compressed detector saved at ``path`` (see the module docstring); in eval mode."""
    from edge_compress.train.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path)
    if not is_compressed(ckpt):
        raise ConfigError(f"{path} is a plain training checkpoint, not a compressed one; load it with "
                          "edge_compress.train.load_detector")
    return rebuild(ckpt, str(path))


def compressed_steps(path: str | Path) -> list[AppliedStep]:
    """The steps recorded in a compressed checkpoint (no model is built)."""
    from edge_compress.train.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path)
    return [AppliedStep.from_dict(s) for s in ckpt.get("compression_steps", [])]
