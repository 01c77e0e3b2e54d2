"""k-means weight sharing (Deep Compression: Han et al., ICLR 2016, arXiv:1510.00149; survey family 4).

``cluster_weights(model, KMeansConfig(...))`` clusters each selected layer's weights into
``2**bits`` shared values (one codebook per layer, as in the paper) and replaces the weight
by a ``SharedWeight`` module holding

* ``centroids``: the codebook, a trainable ``nn.Parameter`` of ``2**bits`` floats;
* ``index``: a ``uint8`` buffer, the weight's shape, each entry the centroid it uses;

so that ``weight = centroids[index]``. Fine-tuning then updates the shared centroids only:
the gradient of a centroid is the sum of the gradients of the weights that share it (the
backward of the gather; the paper's eq. 3), and the assignment never changes.

Clustering: 1-D Lloyd iterations on the layer's weights in float64 (assignment to the
nearest centroid, centroid = mean of its weights; an empty cluster keeps its value),
initialised ``linear`` (evenly spaced between min and max: the paper's best, since it keeps
the rare large weights represented) or ``density`` (at the quantiles of the weights).

Size: ``bits`` per weight plus the float32 codebook (and bias) per layer; the deployed
layer decodes to float, so this is a size reduction, not a speed-up.
Default layers: every ``Conv2d``/``Linear`` except the head's output convs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_compress.compress.layers import check_names, choose_layers, weight_layers
from edge_compress.compress.ste import FrozenWeight, float_bytes, layer_bytes
from edge_compress.errors import ConfigError, require_known_keys

INITS = ("linear", "density")
MAX_BITS = 8          # the index is a uint8


@dataclass(frozen=True)
class KMeansConfig:
    """``bits`` per weight (codebook of ``2**bits`` values) for every chosen layer, or
    ``per_layer_bits[name]``; ``layers`` are ``named_modules()`` names (empty: every
    Conv2d/Linear except the head's output convs); ``iterations`` caps Lloyd's loop."""

    bits: int = 4
    per_layer_bits: dict[str, int] | None = None
    layers: tuple[str, ...] = ()
    init: str = "linear"
    iterations: int = 50

    def __post_init__(self) -> None:
        _check_bits("kmeans.bits", self.bits)
        if isinstance(self.layers, str):
            raise ConfigError(f"kmeans.layers='{self.layers}' must be a list of layer names, not one string")
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.per_layer_bits is not None:
            object.__setattr__(self, "per_layer_bits", dict(self.per_layer_bits))
            for name, b in self.per_layer_bits.items():
                _check_bits(f"kmeans.per_layer_bits['{name}']", b)
        if self.init not in INITS:
            raise ConfigError(f"kmeans.init='{self.init}' is unknown; choose one of: {', '.join(INITS)}")
        if not isinstance(self.iterations, int) or self.iterations < 1:
            raise ConfigError(f"kmeans.iterations={self.iterations} must be an integer >= 1 (e.g. 50)")

    def __hash__(self) -> int:   # per_layer_bits is a dict: hash its items
        per = tuple(sorted(self.per_layer_bits.items())) if self.per_layer_bits is not None else None
        return hash((self.bits, per, self.layers, self.init, self.iterations))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> "KMeansConfig":
        require_known_keys(cls, d, what="kmeans setting", source=source)
        return cls(**d)


def _check_bits(what: str, bits) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= MAX_BITS:
        raise ConfigError(f"{what}={bits!r} must be an integer in 1..{MAX_BITS} (a codebook of 2**bits shared "
                          "values; Deep Compression uses 4 for convs)")


# ---- clustering (pure functions of a weight array) ----

def init_centroids(w: np.ndarray, k: int, init: str) -> np.ndarray:
    if init == "linear":
        return np.linspace(w.min(), w.max(), k)
    return np.quantile(w, (np.arange(k) + 0.5) / k)


def assign(w: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for every weight (ties to the lower one); centroids sorted."""
    mid = (centroids[1:] + centroids[:-1]) / 2
    return np.searchsorted(mid, w, side="left")


def lloyd(w: np.ndarray, k: int, init: str = "linear", iterations: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means of ``w`` (float64): ``(centroids (k,), index like w)``; stops when no weight moves."""
    w = np.asarray(w, np.float64).ravel()
    c = init_centroids(w, k, init)
    idx = assign(w, c)
    for _ in range(iterations):
        sums, counts = np.bincount(idx, w, k), np.bincount(idx, minlength=k)
        c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        c = np.sort(c)
        new = assign(w, c)
        if np.array_equal(new, idx):
            break
        idx = new
    return c, idx


# ---- the layer ----

class SharedWeight(nn.Module):
    """``centroids[index]``: a trainable codebook and a uint8 map of the weight's shape."""

    def __init__(self, centroids: torch.Tensor, index: torch.Tensor):
        super().__init__()
        self.centroids = nn.Parameter(centroids)
        self.register_buffer("index", index.to(torch.uint8))

    def forward(self) -> torch.Tensor:
        return self.centroids[self.index.long()]

    def extra_repr(self) -> str:
        return f"k={self.centroids.numel()}, shape={tuple(self.index.shape)}"


class _Clustered(FrozenWeight):
    """A Conv2d/Linear whose ``weight`` is ``shared()``; the layer's own forward is unchanged."""

    shared: SharedWeight

    @property
    def weight(self) -> torch.Tensor:
        return self.layer_weight()

    def weight_sources(self) -> tuple[torch.Tensor, ...]:
        return (self.shared.centroids, self.shared.index)

    def effective_weight(self) -> torch.Tensor:
        return self.shared()


class KMeansConv2d(_Clustered, nn.Conv2d):
    """A ``Conv2d`` with k-means shared weights (state_dict: ``shared.centroids``, ``shared.index``, ``bias``)."""


class KMeansLinear(_Clustered, nn.Linear):
    """A ``Linear`` with k-means shared weights."""


def make_clustered(layer: nn.Module, centroids: torch.Tensor, index: torch.Tensor) -> None:
    """Turn ``layer`` into its clustered twin in place: its ``weight`` parameter is dropped and
    ``shared`` (``centroids``, ``index``) takes its place."""
    if type(layer) not in (nn.Conv2d, nn.Linear):
        raise ConfigError(f"cannot cluster a {type(layer).__name__}: only plain Conv2d/Linear layers")
    if tuple(index.shape) != tuple(layer.weight.shape):
        raise ConfigError(f"k-means index of shape {tuple(index.shape)} does not fit the weight "
                          f"{tuple(layer.weight.shape)}")
    device = layer.weight.device
    del layer._parameters["weight"]
    layer.__class__ = KMeansConv2d if isinstance(layer, nn.Conv2d) else KMeansLinear
    layer.shared = SharedWeight(centroids.to(device), index.to(device))


@dataclass(frozen=True)
class ClusteredLayer:
    name: str
    bits: int
    weights: int
    rel_error: float          # ||W - centroids[index]|| / ||W|| right after clustering


@dataclass(frozen=True)
class KMeansReport:
    """Clustered layers and the size by this method's accounting: ``bits`` per weight + the
    float32 codebook (+ bias) per layer, every other parameter and buffer float32."""

    layers: tuple[ClusteredLayer, ...]
    skipped: dict[str, str]
    bytes_fp32: int
    bytes_compressed: int
    plan: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": "kmeans", "bytes_fp32": self.bytes_fp32, "bytes_compressed": self.bytes_compressed,
                "size_ratio": self.bytes_compressed / max(self.bytes_fp32, 1), "skipped": dict(self.skipped),
                "layers": {x.name: {"bits": x.bits, "weights": x.weights, "rel_error": x.rel_error}
                           for x in self.layers},
                "plan": self.plan}


def restructure(model: nn.Module, plan: dict[str, Any]) -> None:
    """Give each layer named in ``plan["layers"]`` an (empty) codebook of ``2**bits`` centroids."""
    layers = weight_layers(model)
    check_names(plan["layers"], layers, "kmeans plan")
    for name, entry in plan["layers"].items():
        w = layers[name].weight
        make_clustered(layers[name], torch.zeros(2 ** entry["bits"], dtype=w.dtype),
                       torch.zeros(w.shape, dtype=torch.uint8))


def cluster_weights(model: nn.Module, config: KMeansConfig) -> KMeansReport:
    """Cluster the selected layers' weights in place; returns the report."""
    _, chosen, skipped = choose_layers(model, config.layers, config.per_layer_bits or {},
                                       ("kmeans.layers", "kmeans.per_layer_bits"), "kept float")
    bytes_fp32 = float_bytes(model)
    layers = weight_layers(model)
    per = config.per_layer_bits or {}
    rows, plan = [], {"method": "kmeans", "layers": {}}
    for name in chosen:
        bits = per.get(name, config.bits)
        w = layers[name].weight.detach()
        c, idx = lloyd(w.cpu().double().numpy(), 2 ** bits, config.init, config.iterations)
        centroids = torch.from_numpy(c).to(w.dtype)
        index = torch.from_numpy(idx.reshape(w.shape).astype(np.uint8))
        err = float((centroids[index.long()] - w.cpu()).norm() / w.norm().clamp_min(1e-30))
        make_clustered(layers[name], centroids, index)
        rows.append(ClusteredLayer(name, bits, w.numel(), err))
        plan["layers"][name] = {"replaced_by": type(layers[name]).__name__, "bits": bits}
    compressed = float_bytes(model, chosen) + sum(layer_bytes(layers[r.name], r.bits, 2 ** r.bits) for r in rows)
    return KMeansReport(tuple(rows), skipped, bytes_fp32, compressed, plan)
