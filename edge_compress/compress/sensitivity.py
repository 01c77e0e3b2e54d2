"""Per-layer sensitivity: the mAP a detector loses when ONE layer is pruned or quantized.

``sensitivity(model, data, SensitivityConfig(...))`` applies, for every chosen layer and
every setting, only that change to a copy of the model, scores it on the val split
without fine-tuning and records AP/AP50, params and MACs next to the baseline (the
per-layer analysis of Li et al. 2017, Fig. 2, and of HAQ/AMC-style searches):

* ``prune:<ratio>``: ``ratio`` of the filters of that conv removed by the structured
  pruner (``prune_channels`` with a per-layer ratio; coupled channels go with them), by
  ``criterion``;
* ``bits:<b>``: that layer's weights quantized per output channel, symmetric, to ``b``
  bits (``q = clamp(round(w / s), -(2^(b-1)-1), 2^(b-1)-1)``, ``s = max|w| / (2^(b-1)-1)``);
  activations stay float: this isolates the weight precision the search assigns per layer.

A setting that cannot be applied to a layer (a head output conv, a conv whose channels
are not prunable, ...) is recorded with its reason instead of a score. The result is
JSON data, ``layer -> setting -> {ap, ap50, ap_drop, ap50_drop, params, macs}``, read by
the latency-budget search.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from edge_compress.compress.layers import choose_layers
from edge_compress.errors import ArtifactError, ConfigError, EdgeCompressError, require_known_keys
from edge_compress.io import write_json_atomic

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class SensitivityConfig:
    """Settings to try per layer. ``layers`` empty: every Conv2d/Linear but the head outputs.
    ``max_images``: score on the first N val images only (None: all)."""

    prune_ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    bits: tuple[int, ...] = (8, 4)
    layers: tuple[str, ...] = ()
    criterion: str = "l1"
    max_images: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "prune_ratios", tuple(float(r) for r in self.prune_ratios))
        object.__setattr__(self, "bits", tuple(self.bits))
        object.__setattr__(self, "layers", tuple(self.layers))
        for r in self.prune_ratios:
            if not 0.0 < r < 1.0:
                raise ConfigError(f"sensitivity.prune_ratios has {r}: each ratio is the fraction of a layer's "
                                  "filters removed, in (0, 1) (e.g. 0.25, 0.5)")
        for b in self.bits:
            if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 16:
                raise ConfigError(f"sensitivity.bits has {b!r}: a bit-width is an integer in [2, 16] (e.g. 8, 4)")
        if not self.prune_ratios and not self.bits:
            raise ConfigError("sensitivity: prune_ratios and bits are both empty, nothing to measure")
        if self.max_images is not None and (isinstance(self.max_images, bool) or int(self.max_images) < 1):
            raise ConfigError(f"sensitivity.max_images={self.max_images}: give a positive number of images")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> "SensitivityConfig":
        require_known_keys(cls, d, what="sensitivity setting", source=source)
        return cls(**d)


@dataclass(frozen=True)
class Score:
    params: int
    macs: int
    ap: float
    ap50: float

    def to_dict(self, base: "Score | None" = None) -> dict[str, Any]:
        d = {"ap": self.ap, "ap50": self.ap50, "params": self.params, "macs": self.macs}
        if base is not None:
            d.update(ap_drop=base.ap - self.ap, ap50_drop=base.ap50 - self.ap50)
        return d


@dataclass
class SensitivityResult:
    """Baseline and, per layer and setting, a ``Score`` or the reason the setting could not apply."""

    model: dict[str, Any]
    config: SensitivityConfig
    baseline: Score
    num_images: int
    layers: dict[str, dict[str, Score | str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        rows = {name: {k: (v.to_dict(self.baseline) if isinstance(v, Score) else {"error": v})
                       for k, v in settings.items()} for name, settings in self.layers.items()}
        return {"schema": SCHEMA_VERSION, "model": self.model, "config": self.config.to_dict(),
                "num_images": self.num_images, "baseline": self.baseline.to_dict(), "layers": rows}

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        path = Path(path)
        if path.exists() and not overwrite:
            raise ArtifactError(f"{path} already exists; choose another file (results are never overwritten)")
        write_json_atomic(path, self.to_dict())
        return path


def load_sensitivity(path: str | Path) -> dict[str, Any]:
    """The JSON data written by :meth:`SensitivityResult.save` (schema checked)."""
    d = json.loads(Path(path).read_text())
    if d.get("schema") != SCHEMA_VERSION or "layers" not in d:
        raise ArtifactError(f"{path} is not a sensitivity file of schema {SCHEMA_VERSION}")
    return d


# ---- the two single-layer changes ----

def quantize_weight_(module: nn.Module, bits: int) -> None:
    """Round ``module``'s weight in place to ``bits``-bit symmetric per-output-channel levels
    (the unmasked original when the weight is masked: pruned zeros stay zero)."""
    w = module.parametrizations.weight.original if parametrize.is_parametrized(module, "weight") else module.weight
    with torch.no_grad():
        w.copy_(fake_quant_per_channel(w, bits))


def fake_quant_per_channel(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``w`` rounded to ``2^(bits-1)-1`` symmetric levels per output channel (dim 0), dequantized."""
    qmax = 2 ** (bits - 1) - 1
    scale = w.detach().abs().flatten(1).amax(1).clamp_min(torch.finfo(w.dtype).tiny) / qmax
    scale = scale.view(-1, *([1] * (w.ndim - 1)))
    return torch.clamp(torch.round(w / scale), -qmax, qmax) * scale


def prune_layer_(model: nn.Module, name: str, ratio: float, criterion: str, batches) -> None:
    """Remove ``ratio`` of conv ``name``'s filters (and what is coupled to them) with the structured pruner."""
    from edge_compress.compress.structured import ChannelPruneConfig, prune_channels

    report = prune_channels(model, ChannelPruneConfig(criterion=criterion, ratio={name: ratio}),
                            taylor_batches=batches)
    if not any(g.kept < g.size for g in report.groups):
        raise ConfigError(f"no channel of '{name}' could be removed at ratio {ratio}")


# ---- the verb ----

def _subset(dataset, n: int | None):
    """The first ``n`` images of a ``CocoDataset`` (scored against the same annotation file)."""
    if n is None or n >= len(dataset):
        return dataset
    sub = copy.copy(dataset)
    sub.records = dataset.records[:n]
    sub.image_ids = dataset.image_ids[:n]
    return sub


def _score(model: nn.Module, val_data) -> Score:
    from edge_compress.eval.runner import evaluate_model
    from edge_compress.models.summary import summarize

    s = summarize(model)
    m = evaluate_model(model, val_data)
    return Score(s.params, s.macs, float(m.ap), float(m.ap50))


def _try(model: nn.Module, change: Callable[[nn.Module], None], val_data) -> Score | str:
    trial = copy.deepcopy(model)
    try:
        change(trial)
        return _score(trial.eval(), val_data)
    except (EdgeCompressError, RuntimeError) as e:   # a candidate that cannot apply is data, not a crash
        return f"{type(e).__name__}: {e}"


def sensitivity(model: nn.Module, data, config: SensitivityConfig, log: Callable[[str], None] | None = None,
                train_data=None) -> SensitivityResult:
    """Measure every (layer, setting) of ``config`` on ``data`` (a val ``CocoDataset``, or a dataset
    directory whose val split is used). ``train_data`` gives the batches of the 'taylor' criterion."""
    log = log or (lambda msg: None)
    val = _subset(_val_split(model, data), config.max_images)
    model = model.cpu().eval()
    _, chosen, _ = choose_layers(model, config.layers, (), ("sensitivity.layers", "sensitivity.layers"), "kept")
    batches = None
    if config.prune_ratios and config.criterion == "taylor":
        from edge_compress.compress.recipe import training_batches

        batches = training_batches(model, train_data if train_data is not None else _train_split(model, data))
    result = SensitivityResult(model.config(), config, _score(model, val), len(val))
    log(f"baseline: AP {result.baseline.ap:.4f} AP50 {result.baseline.ap50:.4f} on {len(val)} images")
    for i, name in enumerate(chosen):
        row = result.layers.setdefault(name, {})
        for r in config.prune_ratios:
            row[f"prune:{r:g}"] = _try(model, lambda m: prune_layer_(m, name, r, config.criterion, batches), val)
        for b in config.bits:
            row[f"bits:{b}"] = _try(model, lambda m: quantize_weight_(m.get_submodule(name), b), val)
        log(f"[{i + 1}/{len(chosen)}] {name}: " + ", ".join(
            f"{k} {result.baseline.ap - v.ap:+.4f}" if isinstance(v, Score) else f"{k} n/a" for k, v in row.items()))
    return result


def _val_split(model: nn.Module, data):
    if hasattr(data, "coco_gt_path"):
        return data
    from edge_compress.pipeline import open_split

    spec = model.input_spec
    return open_split(data, "val", (spec.height, spec.width))


def _train_split(model: nn.Module, data):
    from edge_compress.pipeline import open_split

    if hasattr(data, "coco_gt_path"):
        raise ConfigError("sensitivity.criterion='taylor' needs training batches: pass train_data=, or the "
                          "dataset directory instead of a dataset object")
    spec = model.input_spec
    return open_split(data, "train", (spec.height, spec.width))
