"""Unstructured (weight) pruning: magnitude, LAMP and N:M masks (survey family 1).

``prune_unstructured(model, SparsityConfig(...))`` computes a boolean keep-mask per
layer and attaches it with ``torch.nn.utils.parametrize``: the layer's ``weight``
becomes ``original * mask``, so a pruned weight stays exactly zero through any
fine-tuning (its gradient is masked too) and the state_dict holds
``<layer>.parametrizations.weight.original`` plus the mask buffer. ``masks(model)``
hands the masks to lowering as real sparsity; ``remove_masks(model)`` bakes them in.

Methods:
* ``magnitude`` (Han et al., NeurIPS 2015): drop the smallest ``|w|``, per layer
  (``scope="layer"``: exactly ``round(sparsity * numel)`` zeros in every layer) or
  with one threshold over all selected layers (``scope="global"``).
* ``lamp`` (Lee et al., "Layer-adaptive sparsity for the magnitude-based pruning",
  ICLR 2021): score ``w_u^2 / sum_{|w_v| >= |w_u|} w_v^2`` within the layer (ties
  broken by sort order), then one global threshold on the scores. Within a layer the
  score orders weights like ``|w|``, so LAMP is global by definition.
* ``nm`` (Mishra et al. 2021, "Accelerating sparse deep neural networks"; the 2:4
  pattern of NVIDIA sparse tensor cores): in every group of ``m`` consecutive
  weights along the input-channel dimension keep the ``n`` largest ``|w|``. Layers
  whose input channels per group are not a multiple of ``m`` (the RGB stem,
  depthwise convs) cannot carry the pattern and are skipped with that reason.

Default layers: every ``Conv2d``/``Linear`` except the head's output convs (found on
the autograd graph, see ``edge_compress.compress.layers.output_layers``): the small
predictors of logits and box offsets, where a detector loses most for little size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from edge_compress.compress.layers import check_names, choose_layers, weight_layers
from edge_compress.errors import ConfigError, require_known_keys

METHODS = ("magnitude", "lamp", "nm")
SCOPES = ("layer", "global")


@dataclass(frozen=True)
class SparsityConfig:
    """What to prune and how much; validated on creation (see the module docstring).

    ``sparsity`` is the fraction of zeros in [0, 1); for ``nm`` it must equal ``1 - n/m``.
    ``layers`` (empty: the default set) and the keys of ``per_layer`` (a ratio per
    layer, ``scope="layer"`` only) are ``named_modules()`` names; a name that matches
    no layer of the model is an error when the config is applied.
    """

    method: str
    sparsity: float
    scope: str = "layer"
    n: int = 2
    m: int = 4
    layers: tuple[str, ...] = ()
    per_layer: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"sparsity.method='{self.method}' is unknown; choose one of: {', '.join(METHODS)}")
        if self.scope not in SCOPES:
            raise ConfigError(f"sparsity.scope='{self.scope}' is unknown; choose one of: {', '.join(SCOPES)}")
        _check_ratio("sparsity.sparsity", self.sparsity)
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.per_layer is not None:
            object.__setattr__(self, "per_layer", dict(self.per_layer))
            for name, ratio in self.per_layer.items():
                _check_ratio(f"sparsity.per_layer['{name}']", ratio)
        self._check_method()

    def _check_method(self) -> None:
        if self.method == "lamp" and self.scope != "global":
            raise ConfigError("sparsity.method='lamp' with scope='layer': LAMP ranks weights across layers "
                              "(Lee et al. 2021) and per layer equals magnitude; use scope='global' or "
                              "method='magnitude'")
        if self.per_layer and self.scope != "layer":
            raise ConfigError(f"sparsity.per_layer is set with scope='{self.scope}': per-layer ratios need "
                              "scope='layer' (a global threshold decides the ratios itself)")
        if self.method == "nm":
            self._check_nm()

    def _check_nm(self) -> None:
        if not 0 < self.n < self.m:
            raise ConfigError(f"sparsity N:M = {self.n}:{self.m} is invalid: need 0 < n < m (e.g. 2:4)")
        if abs(self.sparsity - (1 - self.n / self.m)) > 1e-9:
            raise ConfigError(f"sparsity.sparsity={self.sparsity} disagrees with N:M = {self.n}:{self.m}, "
                              f"which gives {1 - self.n / self.m}; set sparsity={1 - self.n / self.m}")
        if self.scope != "layer" or self.per_layer:
            raise ConfigError("sparsity.method='nm' has a fixed pattern per layer: use scope='layer' "
                              "and no per_layer ratios")

    def __hash__(self) -> int:   # per_layer is a dict: hash its items
        items = tuple(sorted(self.per_layer.items())) if self.per_layer is not None else None
        return hash((self.method, self.sparsity, self.scope, self.n, self.m, self.layers, items))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SparsityConfig":
        require_known_keys(cls, d, what="sparsity setting")
        return cls(**d)


def _check_ratio(what: str, value: float) -> None:
    if not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{what}={value} is outside [0, 1): it is the fraction of weights set to zero "
                          "(0.5 = half of them)")


@dataclass(frozen=True)
class LayerSparsity:
    name: str
    numel: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Sparsity achieved per pruned layer and in total; ``skipped`` maps a layer to why it was left dense."""

    method: str
    layers: tuple[LayerSparsity, ...]
    params_total: int                 # every parameter of the model
    params_nonzero: int               # parameters of the model that are not zero after masking
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Zeros over weights of the pruned layers."""
        numel = sum(layer.numel for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / numel if numel else 0.0

    @property
    def plan(self) -> dict[str, Any]:
        """The structural change: which layers carry a ``WeightMask`` (the masks are in the state_dict)."""
        return {"masked": [x.name for x in self.layers]}

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "sparsity": self.sparsity, "params_total": self.params_total,
                "params_nonzero": self.params_nonzero, "skipped": dict(self.skipped), "plan": self.plan,
                "layers": {x.name: {"numel": x.numel, "zeros": x.zeros, "sparsity": x.sparsity}
                           for x in self.layers}}


class WeightMask(nn.Module):
    """Parametrization ``weight = original * mask``; the bool mask is a buffer (saved in the state_dict)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


# ---- scores and masks (pure functions of weight tensors) ----

def keep_smallest_out(scores: torch.Tensor, num_zeros: int) -> torch.Tensor:
    """Bool keep-mask that zeroes exactly the ``num_zeros`` lowest scores (ties by index)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if num_zeros > 0:
        keep[torch.argsort(scores.flatten(), stable=True)[:num_zeros]] = False
    return keep.view_as(scores)


def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP score of every weight (Lee et al. 2021, eq. 2): ``w_u^2 / sum_{v >= u} w_v^2`` with
    the layer's weights sorted by ascending ``|w|`` (ties broken by index)."""
    sq = weight.detach().flatten().double() ** 2
    order = torch.argsort(sq, stable=True)
    sorted_sq = sq[order]
    tail = sorted_sq.flip(0).cumsum(0).flip(0)          # sum of the weights at or above each position
    scores = torch.empty_like(sq)
    scores[order] = sorted_sq / tail.clamp_min(torch.finfo(torch.float64).tiny)
    return scores.view_as(weight)


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest ``|w|`` in every group of ``m`` consecutive input channels."""
    w = weight.detach().abs().movedim(1, -1)            # (OC, [KH, KW,] IC): groups along IC
    groups = w.reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, torch.topk(groups, n, dim=1).indices, True)
    return keep.view(w.shape).movedim(-1, 1).contiguous()


def layer_masks(weights: dict[str, torch.Tensor], config: SparsityConfig) -> dict[str, torch.Tensor]:
    """Keep-masks for the given weights under ``config`` (names already resolved)."""
    if config.method == "nm":
        return {name: nm_mask(w, config.n, config.m) for name, w in weights.items()}
    if config.scope == "global":
        score = lamp_scores if config.method == "lamp" else (lambda w: w.detach().abs().double())
        return _global_masks({name: score(w) for name, w in weights.items()}, config.sparsity)
    ratios = config.per_layer or {}
    return {name: keep_smallest_out(w.detach().abs(), round(ratios.get(name, config.sparsity) * w.numel()))
            for name, w in weights.items()}


def _global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One threshold over every layer's scores: exactly ``round(sparsity * total)`` zeros."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = keep_smallest_out(flat, round(sparsity * flat.numel()))
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start:start + s.numel()].view_as(s)
        start += s.numel()
    return out


# ---- applying masks to a model ----

def select_layers(model: nn.Module, config: SparsityConfig) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Layers to prune (``config.layers`` or the default set, plus ``per_layer`` keys) and skipped ones."""
    layers, chosen, skipped = choose_layers(model, config.layers, config.per_layer or {},
                                            ("sparsity.layers", "sparsity.per_layer"), "kept dense")
    if config.method == "nm":
        chosen = _nm_compatible(layers, chosen, config, skipped)
    return {name: layers[name] for name in chosen}, skipped


def _nm_compatible(layers: dict[str, nn.Module], chosen: list[str], config: SparsityConfig,
                   skipped: dict[str, str]) -> list[str]:
    ok = []
    for name in chosen:
        ic = layers[name].weight.shape[1]
        if ic % config.m:
            if config.layers:
                raise ConfigError(f"sparsity.layers names '{name}' whose {ic} input channels per group are not "
                                  f"a multiple of m={config.m}: N:M needs whole groups; leave it out")
            skipped[name] = f"{ic} input channels per group not a multiple of m={config.m}"
        else:
            ok.append(name)
    return ok


def attach_mask(module: nn.Module, keep: torch.Tensor) -> None:
    """Attach (or replace) the module's weight mask and zero the pruned originals."""
    keep = keep.to(device=module.weight.device)
    if parametrize.is_parametrized(module, "weight"):
        for p in module.parametrizations.weight:
            if isinstance(p, WeightMask):
                p.mask.copy_(keep)
                module.parametrizations.weight.original.data.mul_(keep)
                return
    with torch.no_grad():
        module.weight.mul_(keep)
    parametrize.register_parametrization(module, "weight", WeightMask(keep))


def prune_unstructured(model: nn.Module, config: SparsityConfig) -> SparsityReport:
    """Mask the selected layers' weights in place (``config`` decides which and how); returns the report."""
    chosen, skipped = select_layers(model, config)
    keeps = layer_masks({name: m.weight for name, m in chosen.items()}, config)
    for name, module in chosen.items():
        attach_mask(module, keeps[name])
    return _report(model, config.method, list(chosen), skipped)


def _report(model: nn.Module, method: str, names: list[str], skipped: dict[str, str]) -> SparsityReport:
    layers = weight_layers(model)
    rows = tuple(LayerSparsity(n, layers[n].weight.numel(), int((layers[n].weight == 0).sum())) for n in names)
    return SparsityReport(method, rows, *effective_param_counts(model), skipped)


def effective_param_counts(model: nn.Module) -> tuple[int, int]:
    """(total, nonzero) over the model's effective weights: a masked weight counts as masked, and a
    weight computed from other tensors (``ste.FrozenWeight``: k-means codebook + index, ternary,
    binary) counts as the weight it computes, one entry per element, not as its sources (a
    4-bit clustered conv has as many weights as before, stored as indices)."""
    from edge_compress.compress.ste import FrozenWeight

    total = nonzero = 0
    seen = set()
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            w = m.weight.detach()
            seen.add(id(m.parametrizations.weight.original))
        elif isinstance(m, FrozenWeight):
            w = m.frozen_weight()
            seen.update(id(t) for t in m.weight_sources())
        else:
            continue
        total, nonzero = total + w.numel(), nonzero + int((w != 0).sum())
    for p in model.parameters():
        if id(p) not in seen:
            total, nonzero = total + p.numel(), nonzero + int((p.detach() != 0).sum())
    return total, nonzero


def restructure(model: nn.Module, plan: dict[str, Any]) -> None:
    """Re-attach an all-keep ``WeightMask`` to every layer of ``plan["masked"]`` on a fresh detector,
    so that ``load_state_dict`` of the pruned model restores the masks and masked weights exactly."""
    layers = weight_layers(model)
    names = list(plan.get("masked", []))
    check_names(names, layers, "sparsity plan")
    for name in names:
        module = layers[name]
        if not parametrize.is_parametrized(module, "weight"):
            parametrize.register_parametrization(module, "weight", WeightMask(torch.ones_like(module.weight)))


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Layer name -> bool keep-mask (True = weight kept) for every layer carrying a ``WeightMask``."""
    out = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            out.update({name: p.mask.clone() for p in module.parametrizations.weight if isinstance(p, WeightMask)})
    return out


def baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose masked weights are plain parameters holding ``original * mask``; ``model``
    keeps its masks. (``remove_masks`` on a deep copy would not do: parametrize swaps in a class shared
    by the copy and the original, and removing it from one breaks the other.)"""
    baked = copy.deepcopy(model)
    for name in masks(model):
        module = baked.get_submodule(name)
        weight = module.weight.detach().clone()
        plain = type(module).__bases__[0]            # ParametrizedConv2d -> Conv2d
        del module._modules["parametrizations"]
        module.__class__ = plain
        module.weight = nn.Parameter(weight)
    return baked


def remove_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Bake every mask into its weight (a plain ``weight`` parameter again); returns the masks removed."""
    removed = masks(model)
    for name in removed:
        parametrize.remove_parametrizations(model.get_submodule(name), "weight", leave_parametrized=True)
    return removed
