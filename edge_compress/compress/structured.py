"""Structured (channel) pruning: physically remove filters and the channels coupled to them.

``prune_channels(model, ChannelPruneConfig(...))`` finds the model's channel groups
(:mod:`edge_compress.compress.depgraph`: a conv's filters with its BatchNorm, the next
convs' input channels, both sides of residual adds and SE gates, the pieces of concats
and CSP splits, depthwise convs in between), scores every group channel, and slices
every module of each group to the kept channels. The result is a smaller dense
network: fewer parameters and MACs on every runtime, no sparse kernels needed.

Criteria (the score of a group channel sums its coupled members):
* ``l1`` (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017): L1 norm of
  the conv weights the channel owns (its filters, and its input slices in the next convs);
* ``bn_scale`` (Liu et al., "Learning Efficient Convolutional Networks through Network
  Slimming", ICCV 2017): ``|gamma|`` of its BatchNorms (mean over them), best after
  sparsity training with :func:`bn_l1_penalty` added to the loss;
* ``taylor`` (Molchanov et al., "Importance Estimation for Neural Network Pruning",
  CVPR 2019): ``(sum over the channel's parameters of w * dL/dw)^2``, the first-order
  loss change of removing it, averaged over the given batches (gradients in eval mode,
  so BatchNorm running statistics are not touched);
* ``fpgm`` (He et al., "Filter Pruning via Geometric Median", CVPR 2019): the sum of
  Euclidean distances of a filter to the other filters of its conv: filters near the
  geometric median are the most replaceable.

Ratios: ``scope="layer"`` removes ``round(ratio * size)`` channels of every group;
``scope="global"`` ranks all channels together (scores divided by their group's mean,
except ``bn_scale`` whose gammas are already on one scale, as in slimming) and removes
the lowest. ``target="channels"``: ``ratio`` is the fraction of prunable channels
removed; ``target="flops"``: the fraction of the model's MACs removed, reached by
bisection on the global threshold (or the uniform per-group ratio). Each group keeps at
least ``min_channels`` and a multiple of ``round_to`` channels. A dict ``ratio`` keys
per-layer ratios by conv name: the groups whose filters that conv owns.

After slicing, every BatchNorm's running statistics are re-estimated on
``recalibrate_bn`` training batches when the caller passes them (``bn_batches``; a recipe
does), see :mod:`edge_compress.compress.bn`: the statistics of the unpruned network are
what a freshly pruned detector mostly suffers from.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from edge_compress.compress.bn import check_recalibrate_bn, recalibrate_bn
from edge_compress.compress.depgraph import ChannelGroup, DependencyGraph, Member, analyze
from edge_compress.compress.layers import check_names, weight_layers
from edge_compress.errors import ConfigError, require_known_keys
from edge_compress.models.summary import summarize

CRITERIA = ("l1", "bn_scale", "taylor", "fpgm")
SCOPES = ("layer", "global")
TARGETS = ("channels", "flops")


@dataclass(frozen=True)
class ChannelPruneConfig:
    """How much to prune and by which criterion; validated on creation (see the module docstring).

    ``ratio``: a fraction in [0, 1) (of channels or of MACs, per ``target``) or a dict
    conv name -> fraction of that conv's filters (``scope="layer"``, ``target="channels"``).
    ``layers``: convs whose filters may be pruned (empty: every prunable group).
    ``recalibrate_bn``: training batches (of 16 images) to re-estimate BatchNorm statistics
    on after pruning (0: keep the old ones).
    """

    criterion: str = "l1"
    ratio: float | dict[str, float] = 0.5
    scope: str = "layer"
    target: str = "channels"
    round_to: int = 1
    min_channels: int = 1
    layers: tuple[str, ...] = ()
    recalibrate_bn: int = 16

    def __post_init__(self) -> None:
        for name, value, choices in (("criterion", self.criterion, CRITERIA), ("scope", self.scope, SCOPES),
                                     ("target", self.target, TARGETS)):
            if value not in choices:
                raise ConfigError(f"channel_prune.{name}='{value}' is unknown; choose one of: {', '.join(choices)}")
        for name in ("round_to", "min_channels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"channel_prune.{name}={v!r} must be an integer >= 1 (e.g. 8 or 1)")
        check_recalibrate_bn("channel_prune", self.recalibrate_bn)
        object.__setattr__(self, "layers", tuple(self.layers))
        if isinstance(self.ratio, dict):
            object.__setattr__(self, "ratio", dict(self.ratio))
            for name, r in self.ratio.items():
                _check_ratio(f"channel_prune.ratio['{name}']", r)
            if self.scope != "layer" or self.target != "channels":
                raise ConfigError("channel_prune.ratio is a per-layer dict: it needs scope='layer' and "
                                  "target='channels' (a global or FLOPs target decides the ratios itself)")
        else:
            _check_ratio("channel_prune.ratio", self.ratio)

    def __hash__(self) -> int:   # ratio may be a dict: hash its items
        ratio = tuple(sorted(self.ratio.items())) if isinstance(self.ratio, dict) else self.ratio
        return hash((self.criterion, ratio, self.scope, self.target, self.round_to, self.min_channels, self.layers,
                     self.recalibrate_bn))

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["layers"] = list(self.layers)
        d["ratio"] = dict(self.ratio) if isinstance(self.ratio, dict) else self.ratio
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> "ChannelPruneConfig":
        require_known_keys(cls, d, what="channel_prune setting", source=source)
        return cls(**d)


def _check_ratio(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{what}={value!r} is outside [0, 1): it is the fraction removed (0.5 = half; "
                          "1.0 would remove everything)")


@dataclass(frozen=True)
class GroupPrune:
    name: str
    size: int
    kept: int
    producers: tuple[str, ...]


@dataclass(frozen=True)
class ChannelPruneReport:
    """Per pruned group and model totals (MACs as ``edge_compress.models.summarize`` counts them)."""

    criterion: str
    scope: str
    target: str
    groups: tuple[GroupPrune, ...]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    plan: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)
    bn_recalibrated_images: int = 0

    @property
    def channels_before(self) -> int:
        return sum(g.size for g in self.groups)

    @property
    def channels_after(self) -> int:
        return sum(g.kept for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {"criterion": self.criterion, "scope": self.scope, "target": self.target,
                "macs_before": self.macs_before, "macs_after": self.macs_after,
                "params_before": self.params_before, "params_after": self.params_after,
                "channels_before": self.channels_before, "channels_after": self.channels_after,
                "skipped": dict(self.skipped), "plan": self.plan,
                "bn_recalibrated_images": self.bn_recalibrated_images,
                "groups": {g.name: {"size": g.size, "kept": g.kept, "producers": list(g.producers)}
                           for g in self.groups}}


# ---- sparsity training (network slimming)

def bn_l1_penalty(model: nn.Module, weight: float) -> torch.Tensor:
    """``weight * sum |gamma|`` over every BatchNorm2d (Liu et al. 2017, eq. 1's second term):
    add it to the training loss so unimportant channels' scales go to zero before pruning."""
    gammas = [m.weight.abs().sum() for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
    if not gammas:
        raise ConfigError(f"{type(model).__name__} has no affine BatchNorm2d: bn_l1_penalty has no scales to "
                          "penalise; use criterion='l1' or 'fpgm' instead")
    return weight * torch.stack(gammas).sum()


# ---- scores (a vector per group: one score per group channel)

def _per_index(module: nn.Module, dim: int, criterion: str) -> torch.Tensor | None:
    """Score of every index along ``dim`` of one member, or None when it carries none."""
    if isinstance(module, nn.BatchNorm2d):
        return module.weight.detach().abs().double() if criterion == "bn_scale" and module.affine else None
    w = module.weight.detach().double()
    if criterion == "l1":
        return w.abs().movedim(dim, 0).flatten(1).sum(1)
    if criterion == "fpgm" and dim == 0:
        flat = w.flatten(1)
        return torch.cdist(flat[None], flat[None])[0].sum(1)
    return None


def _flat(m: Member) -> tuple[torch.Tensor, torch.Tensor]:
    """A member's indices flattened, with the group channel each belongs to."""
    idx = [i for ix in m.indices for i in ix]
    owner = [k for k, ix in enumerate(m.indices) for _ in ix]
    return torch.tensor(idx, dtype=torch.long), torch.tensor(owner, dtype=torch.long)


def _gather(group: ChannelGroup, m: Member, per: torch.Tensor) -> torch.Tensor:
    """Sum a member's per-index values into the group's channels."""
    idx, owner = _flat(m)
    return torch.zeros(group.size, dtype=torch.float64).index_add_(0, owner, per[idx])


def _static_scores(group: ChannelGroup, modules: dict[str, nn.Module], criterion: str) -> torch.Tensor | None:
    total, count = torch.zeros(group.size, dtype=torch.float64), torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        per = _per_index(modules[m.module], m.dim, criterion)
        if per is not None:
            total += _gather(group, m, per)
            count += _gather(group, m, torch.ones_like(per))
    if not bool((count > 0).all()):
        return None
    return total / count if criterion == "bn_scale" else total


def _taylor_contrib(group: ChannelGroup, modules: dict[str, nn.Module]) -> torch.Tensor:
    """``sum w * dL/dw`` over each group channel's parameters (weights, biases, BN scale and shift)."""
    out = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        module = modules[m.module]
        per = torch.zeros(module.weight.shape[m.dim], dtype=torch.float64)
        params = [module.weight] + ([module.bias] if module.bias is not None and m.dim == 0 else [])
        for p in params:
            if p.grad is not None:
                prod = (p.detach() * p.grad.detach()).double()
                per += prod.movedim(m.dim, 0).reshape(prod.shape[m.dim], -1).sum(1) if prod.dim() > 1 else prod
        out += _gather(group, m, per)
    return out


TaylorBatch = tuple[torch.Tensor, list[torch.Tensor]] | Callable[[], torch.Tensor]


def _taylor_scores(model: nn.Module, groups: list[ChannelGroup], modules: dict[str, nn.Module],
                   batches: Iterable[TaylorBatch] | None) -> list[torch.Tensor]:
    if batches is None:
        raise ConfigError("channel_prune.criterion='taylor' needs gradients: pass taylor_batches=[(images, "
                          "targets), ...] (loss = model.loss(model(images), targets)) or zero-argument callables "
                          "returning a scalar loss")
    scores, n = [torch.zeros(g.size, dtype=torch.float64) for g in groups], 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss = batch() if callable(batch) else model.loss(model(batch[0]), batch[1])[0]
            loss.backward()
            for s, g in zip(scores, groups):
                s += _taylor_contrib(g, modules) ** 2
            n += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if n == 0:
        raise ConfigError("channel_prune.criterion='taylor': taylor_batches was empty; give at least one batch")
    return [s / n for s in scores]


# ---- how many channels each group keeps

def _keep_count(size: int, removed: int, config: ChannelPruneConfig) -> int:
    keep = max(size - removed, min(config.min_channels, size))
    return min(size, math.ceil(keep / config.round_to) * config.round_to)


class _Costs:
    """MACs of a candidate (channels removed per module dim) without touching the model."""

    def __init__(self, graph: DependencyGraph, modules: dict[str, nn.Module], macs_before: int):
        self.graph, self.modules, self.macs_before = graph, modules, macs_before

    def _conv(self, name: str, removed: dict[tuple[str, int], int]) -> int:
        conv = self.modules[name]
        kh, kw = conv.kernel_size
        out = conv.out_channels - removed.get((name, 0), 0)
        if conv.groups == 1:
            per = out * (conv.in_channels - removed.get((name, 1), 0))
        elif conv.groups == conv.in_channels == conv.out_channels:
            per = out
        else:
            per = conv.out_channels * conv.in_channels // conv.groups
        return sum(per * kh * kw * oh * ow for oh, ow in self.graph.conv_calls[name])

    def macs(self, removed: dict[tuple[str, int], int]) -> int:
        names = {name for name, _ in removed}
        delta = sum(self._conv(n, removed) - self._conv(n, {}) for n in names if n in self.graph.conv_calls)
        return self.macs_before + delta


def _removed_counts(groups: list[ChannelGroup], drops: list[list[int]]) -> dict[tuple[str, int], int]:
    counts: dict[tuple[str, int], int] = {}
    for g, drop in zip(groups, drops):
        for m in g.members:
            key = (m.module, m.dim)
            counts[key] = counts.get(key, 0) + sum(len(m.indices[k]) for k in drop)
    return counts


def _lowest(scores: torch.Tensor, n: int) -> list[int]:
    return sorted(torch.argsort(scores, stable=True)[:n].tolist())


def _layer_drops(groups, scores, ratios: list[float], config) -> list[list[int]]:
    return [_lowest(s, g.size - _keep_count(g.size, round(r * g.size), config))
            for g, s, r in zip(groups, scores, ratios)]


def _global_drops(groups, scores, k: int, config) -> list[list[int]]:
    """Remove the ``k`` lowest channels over all groups, then apply min_channels / round_to per group."""
    keyed = [(float(v), gi, ci) for gi, s in enumerate(scores) for ci, v in enumerate(s.tolist())]
    keyed.sort()
    per_group = [0] * len(groups)
    for _, gi, _ in keyed[:k]:
        per_group[gi] += 1
    return [_lowest(s, g.size - _keep_count(g.size, r, config)) for g, s, r in zip(groups, scores, per_group)]


def _bisect(lo: Any, hi: Any, fits: Callable[[Any], bool], integer: bool) -> Any:
    """Smallest value in [lo, hi] for which ``fits`` holds (``hi`` when none does)."""
    if integer:
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
        return lo
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _choose_drops(groups, scores, config, costs: _Costs, per_layer: list[float] | None) -> list[list[int]]:
    """Which channels of each group go, under the config's scope and target."""
    if per_layer is not None:
        return _layer_drops(groups, scores, per_layer, config)
    ratio = float(config.ratio)
    if config.scope == "global":
        norm = scores if config.criterion == "bn_scale" else [s / s.mean().clamp_min(1e-30) for s in scores]
        drops_at = lambda k: _global_drops(groups, norm, k, config)                     # noqa: E731
        total = sum(g.size for g in groups)
        if config.target == "channels":
            return drops_at(round(ratio * total))
        return drops_at(_bisect(0, total, _within(costs, groups, drops_at, ratio), True))
    drops_at = lambda r: _layer_drops(groups, scores, [r] * len(groups), config)      # noqa: E731
    if config.target == "channels" or ratio == 0:
        return drops_at(ratio)
    return drops_at(_bisect(0.0, 1.0 - 1e-9, _within(costs, groups, drops_at, ratio), False))


def _within(costs: _Costs, groups: list[ChannelGroup], drops_at: Callable, ratio: float) -> Callable[[Any], bool]:
    """Whether the candidate at a knob value removes at least ``ratio`` of the model's MACs."""
    budget = (1.0 - ratio) * costs.macs_before
    return lambda knob: costs.macs(_removed_counts(groups, drops_at(knob))) <= budget


# ---- selecting groups

def _per_layer_ratios(groups: list[ChannelGroup], graph: DependencyGraph, modules: dict[str, nn.Module],
                      ratios: dict[str, float]) -> list[float]:
    """Group ratios from per-conv ratios (a group takes the ratio of the convs whose filters it owns)."""
    out = [0.0] * len(groups)
    owner = {name: [i for i, g in enumerate(groups) if name in g.producers(modules)] for name in ratios}
    for name, r in ratios.items():
        if not owner[name]:
            why = _why_unprunable(name, graph, modules)
            raise ConfigError(f"channel_prune.ratio names '{name}', whose filters cannot be pruned: {why}; "
                              "leave it out of the ratios")
        for i in owner[name]:
            other = [n for n in groups[i].producers(modules) if n in ratios and ratios[n] != r]
            if other:
                raise ConfigError(f"channel_prune.ratio gives '{name}' {r} but '{other[0]}' "
                                  f"{ratios[other[0]]}: they share channels (group '{groups[i].name}'), so "
                                  "they must lose the same ones; give them one ratio")
            out[i] = r
    return out


def _why_unprunable(name: str, graph: DependencyGraph, modules: dict[str, nn.Module]) -> str:
    if name in graph.head_outputs:
        return "it is a head output conv: its output channels are the detection outputs"
    if name not in graph.conv_calls:
        return "it is not a Conv2d run by the model's forward"
    reasons = [g.reason for g in graph.groups if name in g.producers(modules) and g.reason]
    return reasons[0] if reasons else "no criterion score (see the report's skipped list)"


def _eligible(model: nn.Module, graph: DependencyGraph, modules: dict[str, nn.Module],
              config: ChannelPruneConfig, skipped: dict[str, str]) -> list[ChannelGroup]:
    layers = weight_layers(model)
    check_names(config.layers, layers, "channel_prune.layers")
    if isinstance(config.ratio, dict):
        check_names(config.ratio, layers, "channel_prune.ratio")
    for name in config.layers:
        if name in graph.head_outputs:
            raise ConfigError(f"channel_prune.layers names '{name}', a head output conv: its output channels are "
                              "the detection outputs; leave it out")
        if not any(g.prunable and name in g.producers(modules) for g in graph.groups):
            raise ConfigError(f"channel_prune.layers names '{name}', whose filters cannot be pruned: "
                              f"{_why_unprunable(name, graph, modules)}; leave it out")
    chosen = []
    for g in graph.groups:
        producers = g.producers(modules)
        if not g.prunable:
            skipped[g.name] = g.reason
        elif not producers:
            skipped[g.name] = "no conv filters to remove"
        elif config.layers and not set(producers) & set(config.layers):
            skipped[g.name] = "not in channel_prune.layers"
        else:
            chosen.append(g)
    return chosen


# ---- applying a plan

def _slice_module(module: nn.Module, name: str, keep: dict[str, list[int]]) -> None:
    """Keep ``keep['out']`` output / ``keep['in']`` input channels of one Conv2d or BatchNorm2d."""
    with torch.no_grad():
        if isinstance(module, nn.BatchNorm2d):
            idx = torch.tensor(keep["out"], dtype=torch.long)
            for attr in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(module, attr)
                if t is not None:
                    t.data = t.data[idx].clone()
            module.num_features = len(idx)
            return
        if not isinstance(module, nn.Conv2d):
            raise ConfigError(f"channel pruning plan names '{name}' ({type(module).__name__}): only Conv2d and "
                              "BatchNorm2d layers are sliced; the plan does not fit this model")
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        if "out" in keep:
            idx = torch.tensor(keep["out"], dtype=torch.long)
            module.weight.data = module.weight.data[idx].clone()
            if module.bias is not None:
                module.bias.data = module.bias.data[idx].clone()
            module.out_channels = len(idx)
            if depthwise:
                module.in_channels = module.groups = len(idx)
        if "in" in keep:
            idx = torch.tensor(keep["in"], dtype=torch.long)
            module.weight.data = module.weight.data[:, idx].clone()
            module.in_channels = len(idx)


def removal_plan(groups: list[ChannelGroup], drops: list[list[int]], modules: dict[str, nn.Module]) -> dict[str, Any]:
    """The plan that removes channels ``drops[i]`` of ``groups[i]``: kept indices per module and
    side ('out': filters / features, 'in': input channels) for every module that loses channels."""
    removed: dict[tuple[str, int], set[int]] = {}
    for g, drop in zip(groups, drops):
        for m in g.members:
            removed.setdefault((m.module, m.dim), set()).update(i for k in drop for i in m.indices[k])
    plan: dict[str, dict[str, list[int]]] = {}
    for (name, dim), gone in sorted(removed.items()):
        if gone:
            size = modules[name].weight.shape[dim]
            plan.setdefault(name, {})["out" if dim == 0 else "in"] = [i for i in range(size) if i not in gone]
    return {"method": "channel_pruning", "modules": plan}


def restructure(model: nn.Module, plan: dict[str, Any]) -> None:
    """Slice a freshly built detector's convs and BatchNorms to the plan's kept channels, so the
    pruned model's state_dict loads into it (strict)."""
    if plan.get("method") != "channel_pruning" or not isinstance(plan.get("modules"), dict):
        raise ConfigError(f"not a channel pruning plan (method={plan.get('method')!r}); expected the 'plan' of "
                          "a ChannelPruneReport.to_dict()")
    modules = dict(model.named_modules())
    bad = [n for n in plan["modules"] if n not in modules]
    if bad:
        raise ConfigError(f"channel pruning plan names module(s) {bad} that this model lacks; build the same "
                          "detector (name, num_classes, input size) the plan was made on")
    for name, keep in plan["modules"].items():
        _slice_module(modules[name], name, keep)


# ---- the verb

def prune_channels(model: nn.Module, config: ChannelPruneConfig, example: torch.Tensor | None = None,
                   taylor_batches: Iterable[TaylorBatch] | None = None,
                   bn_batches: Iterable | None = None) -> ChannelPruneReport:
    """Prune ``model``'s channels in place (see the module docstring); returns the report with its plan.
    ``bn_batches``: training batches to recalibrate BatchNorm on afterwards (when
    ``config.recalibrate_bn`` > 0; a recipe passes ``recalibrate_bn`` of them)."""
    _check_plain(model)
    graph = analyze(model, example)
    modules = dict(model.named_modules())
    skipped: dict[str, str] = {}
    groups = _eligible(model, graph, modules, config, skipped)
    per_layer = _per_layer_ratios(groups, graph, modules, config.ratio) if isinstance(config.ratio, dict) else None
    scores = _scores(model, groups, modules, config, taylor_batches)
    kept = [(g, s, r) for g, s, r in zip(groups, scores, per_layer or [0.0] * len(groups)) if s is not None]
    for g, s in zip(groups, scores):
        if s is None:
            skipped[g.name] = f"no {config.criterion} score (e.g. bn_scale on a group without BatchNorm)"
    groups, scores = [g for g, _, _ in kept], [s for _, s, _ in kept]
    per_layer = [r for _, _, r in kept] if per_layer is not None else None
    before = summarize(model, None if example is None else tuple(example[:1].shape))
    drops = _choose_drops(groups, scores, config, _Costs(graph, modules, before.macs), per_layer)
    plan = removal_plan(groups, drops, modules)
    _check_plan(model, plan, example)
    restructure(model, plan)
    seen = recalibrate_bn(model, bn_batches) if config.recalibrate_bn and bn_batches is not None else 0
    after = summarize(model, None if example is None else tuple(example[:1].shape))
    rows = tuple(GroupPrune(g.name, g.size, g.size - len(d), tuple(g.producers(modules)))
                 for g, d in zip(groups, drops))
    return ChannelPruneReport(config.criterion, config.scope, config.target, rows, before.macs, after.macs,
                              before.params, after.params, plan, skipped, seen)


def _check_plain(model: nn.Module) -> None:
    masked = [n for n, m in model.named_modules() if parametrize.is_parametrized(m)]
    if masked:
        raise ConfigError(f"layers {masked[:3]} carry parametrizations (unstructured masks?): channel pruning "
                          "slices plain weights; prune channels first, or bake the masks in with "
                          "edge_compress.compress.sparsity.remove_masks(model)")


def _check_plan(model: nn.Module, plan: dict[str, Any], example: torch.Tensor | None) -> None:
    """Apply the plan to a copy first: a forward that fails or changes the output shape means the
    dependency analysis missed a coupling; raise before the caller's model is touched."""
    p = next(model.parameters())
    x = example[:1].detach() if example is not None else torch.zeros(
        1, model.input_spec.channels, model.input_spec.height, model.input_spec.width, dtype=p.dtype)
    trial = copy.deepcopy(model).eval()
    with torch.no_grad():
        want = trial(x).shape
        restructure(trial, plan)
        try:
            got = trial(x).shape
        except RuntimeError as exc:
            raise ConfigError(f"channel pruning would break this model's forward ({exc}); the dependency "
                              "analysis missed a coupling: please report it with the model") from exc
    if got != want:
        raise ConfigError(f"channel pruning would change the output shape {tuple(want)} -> {tuple(got)}; "
                          "please report it with the model")


def _scores(model, groups, modules, config, taylor_batches) -> list[torch.Tensor | None]:
    if config.criterion == "taylor":
        return _taylor_scores(model, groups, modules, taylor_batches)
    return [_static_scores(g, modules, config.criterion) for g in groups]
