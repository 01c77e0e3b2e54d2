"""Low-rank decomposition of conv and linear layers (survey family 6).

``decompose(model, LowRankConfig(...))`` replaces layers in place, by name, with a
chain of smaller layers computing a low-rank approximation of the same map:

* 1x1 conv / Linear, SVD (Denton et al., NeurIPS 2014; Jaderberg et al., BMVC 2014):
  ``W = U S V^T`` (``W`` as ``OC x IC``) -> a conv ``IC -> r`` with ``sqrt(S) V^T`` (the
  original stride/padding/dilation) then a 1x1 conv ``r -> OC`` with ``U sqrt(S)`` and
  the original bias.
* KxK conv, Tucker-2 (Kim et al., "Compression of deep convolutional neural networks
  for fast and low power mobile applications", ICLR 2016): HOSVD on the output- and
  input-channel modes only, ``W ~ core x_0 U_out x_1 U_in`` -> 1x1 conv ``IC -> R_in``
  (``U_in^T``), the KxK core conv ``R_in -> R_out`` (same stride/padding/dilation),
  1x1 conv ``R_out -> OC`` (``U_out``) with the original bias. Kim et al. pick ranks
  with VBMF; here a rank is the smallest ``r`` with ``sum(s[:r]^2) / sum(s^2) >= energy``
  per mode (the usual energy rule), or the rank given for the layer (both modes, each
  capped at its channel count).

Skipped, with the reason in the report: grouped/depthwise convs (each filter sees
only ``IC/groups`` channels, so the weight is already block-diagonal; a factorisation
across channels would densify it and add MACs), layers with fewer than
``min_channels`` input or output channels (little to gain, energy-chosen ranks only),
the head's output convs unless named, and any layer whose factorisation would not
reduce its MACs (a layer is replaced only when it gets cheaper). Fine-tune afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from edge_compress.compress.layers import check_names, choose_layers, get_parent, weight_layers
from edge_compress.errors import ConfigError, require_known_keys
from edge_compress.models.summary import LayerStats, summarize


@dataclass(frozen=True)
class LowRankConfig:
    """Rank selection: ``energy`` in (0, 1] for every layer, or ``ranks[name]`` for a layer.

    ``layers`` (empty: every Conv2d/Linear except the head's output convs) and the keys
    of ``ranks`` are ``named_modules()`` names; a name matching no layer is an error.
    """

    energy: float = 0.9
    ranks: dict[str, int] | None = None
    min_channels: int = 16
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 < float(self.energy) <= 1.0:
            raise ConfigError(f"lowrank.energy={self.energy} is outside (0, 1]: it is the fraction of the "
                              "squared singular values kept (0.9 keeps 90%)")
        if int(self.min_channels) != self.min_channels or self.min_channels < 1:
            raise ConfigError(f"lowrank.min_channels={self.min_channels} must be an integer >= 1 (e.g. 16)")
        object.__setattr__(self, "layers", tuple(self.layers))
        if self.ranks is not None:
            object.__setattr__(self, "ranks", dict(self.ranks))
            bad = {k: v for k, v in self.ranks.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
            if bad:
                raise ConfigError(f"lowrank.ranks {bad}: a rank must be an integer >= 1 (e.g. 8)")

    def __hash__(self) -> int:   # ranks is a dict: hash its items
        ranks = tuple(sorted(self.ranks.items())) if self.ranks is not None else None
        return hash((self.energy, ranks, self.min_channels, self.layers))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LowRankConfig":
        require_known_keys(cls, d, what="lowrank setting")
        return cls(**d)


@dataclass(frozen=True)
class LayerDecomposition:
    name: str
    kind: str                        # "svd" or "tucker2"
    ranks: tuple[int, ...]           # (r,) for SVD, (R_in, R_out) for Tucker-2
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int


@dataclass(frozen=True)
class LowRankReport:
    """Per replaced layer and model totals (MACs as ``edge_compress.models.summarize`` counts them)."""

    layers: tuple[LayerDecomposition, ...]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def plan(self) -> dict[str, Any]:
        """The structural change: per replaced layer its kind ("svd"/"tucker2") and ranks."""
        return {"layers": {x.name: {"kind": x.kind, "ranks": list(x.ranks)} for x in self.layers}}

    def to_dict(self) -> dict[str, Any]:
        return {"macs_before": self.macs_before, "macs_after": self.macs_after,
                "params_before": self.params_before, "params_after": self.params_after,
                "skipped": dict(self.skipped), "plan": self.plan,
                "layers": {x.name: {"kind": x.kind, "ranks": list(x.ranks), "macs_before": x.macs_before,
                                    "macs_after": x.macs_after, "params_before": x.params_before,
                                    "params_after": x.params_after} for x in self.layers}}


# ---- factorisations (pure functions of one layer) ----

def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """Smallest ``r`` with ``sum(s[:r]^2) / sum(s^2) >= energy`` (``s`` sorted descending)."""
    sq = s.double() ** 2
    frac = sq.cumsum(0) / sq.sum().clamp_min(torch.finfo(torch.float64).tiny)
    return min(int((frac < energy - 1e-12).sum()) + 1, s.numel())


def mode_singular_values(weight: torch.Tensor, mode: int) -> torch.Tensor:
    """Singular values of the weight unfolded along ``mode`` (0: output channels, 1: input channels)."""
    return torch.linalg.svdvals(weight.detach().double().movedim(mode, 0).flatten(1))


def _svd_factors(w2d: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``W (OC x IC) ~ B @ A`` with ``A = sqrt(S) V^T`` (r x IC) and ``B = U sqrt(S)`` (OC x r)."""
    u, s, vh = torch.linalg.svd(w2d.detach().double(), full_matrices=False)
    root = s[:r].sqrt()
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def empty_chain(module: nn.Module, kind: str, ranks: tuple[int, ...]) -> nn.Sequential:
    """The chain replacing ``module`` (placeholder weights): what ``svd_*``/``tucker2_conv`` fill and
    what ``restructure`` rebuilds before a state_dict is loaded."""
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        return nn.Sequential(nn.Linear(module.in_features, ranks[0], bias=False),
                             nn.Linear(ranks[0], module.out_features, bias=bias))
    conv, geometry = module, dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                                  bias=False, padding_mode=module.padding_mode)
    if kind == "svd":
        return nn.Sequential(nn.Conv2d(conv.in_channels, ranks[0], 1, **geometry),
                             nn.Conv2d(ranks[0], conv.out_channels, 1, bias=bias))
    r_in, r_out = ranks
    return nn.Sequential(nn.Conv2d(conv.in_channels, r_in, 1, bias=False),
                         nn.Conv2d(r_in, r_out, conv.kernel_size, **geometry),
                         nn.Conv2d(r_out, conv.out_channels, 1, bias=bias))


def svd_conv1x1(conv: nn.Conv2d, r: int) -> nn.Sequential:
    """A 1x1 conv as conv ``IC -> r`` (original stride/padding/dilation) then 1x1 conv ``r -> OC``."""
    a, b = _svd_factors(conv.weight.flatten(1), r)
    return _load(empty_chain(conv, "svd", (r,)), conv, [a[:, :, None, None], b[:, :, None, None]])


def svd_linear(linear: nn.Linear, r: int) -> nn.Sequential:
    """A Linear layer as ``Linear(in, r)`` then ``Linear(r, out)`` with the original bias."""
    a, b = _svd_factors(linear.weight, r)
    return _load(empty_chain(linear, "svd", (r,)), linear, [a, b])


def tucker2_factors(weight: torch.Tensor, r_in: int, r_out: int) -> tuple[torch.Tensor, ...]:
    """HOSVD on modes 0 and 1: ``(U_in (IC x R_in), core (R_out x R_in x KH x KW), U_out (OC x R_out))``."""
    w = weight.detach().double()
    u_out = torch.linalg.svd(w.flatten(1), full_matrices=False)[0][:, :r_out]
    u_in = torch.linalg.svd(w.movedim(1, 0).flatten(1), full_matrices=False)[0][:, :r_in]
    core = torch.einsum("oihw,or,is->rshw", w, u_out, u_in)
    return u_in, core, u_out


def tucker2_conv(conv: nn.Conv2d, r_in: int, r_out: int) -> nn.Sequential:
    """A KxK conv as 1x1 ``IC -> R_in``, KxK core ``R_in -> R_out`` (same geometry), 1x1 ``R_out -> OC``."""
    u_in, core, u_out = tucker2_factors(conv.weight, r_in, r_out)
    return _load(empty_chain(conv, "tucker2", (r_in, r_out)), conv,
                 [u_in.T[:, :, None, None], core, u_out[:, :, None, None]])


def _load(chain: nn.Sequential, original: nn.Module, weights: list[torch.Tensor]) -> nn.Sequential:
    """Set the chain's weights (and the original bias on its last layer), on the original's device/dtype."""
    w = original.weight
    chain = chain.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        for layer, value in zip(chain, weights):
            layer.weight.copy_(value.to(w.dtype))
        if original.bias is not None:
            chain[-1].bias.copy_(original.bias)
    return chain


# ---- planning: which layers, which ranks, is it cheaper ----

@dataclass(frozen=True)
class _Plan:
    kind: str
    ranks: tuple[int, ...]
    macs: int
    params: int


def _plan(module: nn.Module, stats: LayerStats, rank: int | None, energy: float) -> _Plan:
    if isinstance(module, nn.Linear):
        return _plan_svd(module.weight, stats.macs // (module.in_features * module.out_features), rank, energy,
                         module.bias)
    oh, ow = stats.out_shape[2:]
    if tuple(module.kernel_size) == (1, 1):
        return _plan_svd(module.weight.flatten(1), oh * ow, rank, energy, module.bias)
    return _plan_tucker(module, stats, rank, energy)


def _plan_svd(w2d: torch.Tensor, positions: int, rank: int | None, energy: float, bias) -> _Plan:
    oc, ic = w2d.shape
    r = min(rank, oc, ic) if rank else rank_for_energy(torch.linalg.svdvals(w2d.detach().double()), energy)
    return _Plan("svd", (r,), positions * r * (ic + oc), r * (ic + oc) + (oc if bias is not None else 0))


def _plan_tucker(conv: nn.Conv2d, stats: LayerStats, rank: int | None, energy: float) -> _Plan:
    oc, ic, kh, kw = conv.weight.shape
    if rank:
        r_in, r_out = min(rank, ic), min(rank, oc)
    else:
        r_out = rank_for_energy(mode_singular_values(conv.weight, 0), energy)
        r_in = rank_for_energy(mode_singular_values(conv.weight, 1), energy)
    h, w = stats.in_shape[2:]
    oh, ow = stats.out_shape[2:]
    macs = h * w * ic * r_in + oh * ow * (r_in * r_out * kh * kw + r_out * oc)
    params = ic * r_in + r_in * r_out * kh * kw + r_out * oc + (oc if conv.bias is not None else 0)
    return _Plan("tucker2", (r_in, r_out), macs, params)


def _build(module: nn.Module, plan: _Plan) -> nn.Sequential:
    if isinstance(module, nn.Linear):
        return svd_linear(module, plan.ranks[0])
    if plan.kind == "svd":
        return svd_conv1x1(module, plan.ranks[0])
    return tucker2_conv(module, *plan.ranks)


def _why_not(module: nn.Module, config: LowRankConfig, explicit_rank: bool) -> str | None:
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        return (f"grouped conv (groups={module.groups}): its weight is already block-diagonal, a "
                "factorisation across channels would densify it and add MACs")
    ic, oc = module.weight.shape[1], module.weight.shape[0]
    if not explicit_rank and min(ic, oc) < config.min_channels:
        return f"{min(ic, oc)} channels < min_channels={config.min_channels}"
    return None


def select_layers(model: nn.Module, config: LowRankConfig) -> tuple[list[str], dict[str, str]]:
    """Candidate layer names (``config.layers`` or the default set, plus ``ranks`` keys) and skipped ones."""
    _, chosen, skipped = choose_layers(model, config.layers, config.ranks or {},
                                     ("lowrank.layers", "lowrank.ranks"), "kept intact")
    return chosen, skipped


def decompose(model: nn.Module, config: LowRankConfig) -> LowRankReport:
    """Replace the selected layers of ``model`` in place by their low-rank chains; returns the report."""
    chosen, skipped = select_layers(model, config)
    before = summarize(model)
    stats = {row.name: row for row in before.layers}
    layers, rows = weight_layers(model), []
    for name in chosen:
        row = _decompose_one(model, name, layers[name], stats.get(name), config, skipped)
        if row is not None:
            rows.append(row)
    after = summarize(model)
    return LowRankReport(tuple(rows), before.macs, after.macs, before.params, after.params, skipped)


def _decompose_one(model: nn.Module, name: str, module: nn.Module, stats: LayerStats | None,
                   config: LowRankConfig, skipped: dict[str, str]) -> LayerDecomposition | None:
    rank = (config.ranks or {}).get(name)
    reason = "not run by the model's forward" if stats is None else _why_not(module, config, rank is not None)
    if reason is None:
        plan = _plan(module, stats, rank, config.energy)
        if plan.macs < stats.macs:
            parent, attr = get_parent(model, name)
            setattr(parent, attr, _build(module, plan))
            return LayerDecomposition(name, plan.kind, plan.ranks, stats.macs, plan.macs, stats.params, plan.params)
        reason = f"ranks {plan.ranks} would not reduce MACs ({plan.macs} >= {stats.macs})"
    skipped[name] = reason
    return None


def restructure(model: nn.Module, plan: dict[str, Any]) -> None:
    """Replace every layer of ``plan["layers"]`` (name -> kind, ranks) on a fresh detector by its
    low-rank chain with placeholder weights, ready for the decomposed model's ``load_state_dict``."""
    entries = dict(plan.get("layers", {}))
    layers = weight_layers(model)
    check_names(entries, layers, "lowrank plan")
    for name, entry in entries.items():
        if entry.get("kind") not in ("svd", "tucker2"):
            raise ConfigError(f"lowrank plan: layer '{name}' has kind={entry.get('kind')!r}; expected 'svd' or "
                              "'tucker2' (the plan was not written by decompose)")
        parent, attr = get_parent(model, name)
        chain = empty_chain(layers[name], entry["kind"], tuple(int(r) for r in entry["ranks"]))
        setattr(parent, attr, chain.to(device=layers[name].weight.device, dtype=layers[name].weight.dtype))
