"""Layer pruning: replace whole blocks by ``nn.Identity`` where the network stays consistent.

Depth pruning removes a block outright instead of thinning it (e.g. the residual-block
pruning of DBP, Chen & Zhao 2018, and of the YOLO layer-pruning literature): a block
can go when its input and output shapes agree and an identity path already carries
its input past it, so dropping it leaves a well-formed network that fine-tuning can
recover. Found on the ``torch.fx`` graph, not by class names:

* ``residual``: a module whose output is ``x + branch(x)`` for its own input ``x``
  (MobileNetV2/V3 inverted residuals with a skip); dropping it leaves ``x``;
* ``parallel``: a module fed by one piece of a channel split whose output is
  concatenated back beside another, untouched piece of the same split (the stride-1
  ShuffleNetV2/ESNet unit's ``branch2``); dropping it passes its piece through, and
  the unit keeps its concat and channel shuffle.

``drop_layers(model, LayerDropConfig(blocks=(...)))`` drops the named blocks, or with
``num_blocks=K`` the K removable blocks of lowest score: the mean ``|w|`` of the
block's last conv (``l1``) or the mean ``|gamma|`` of its last BatchNorm (``bn_scale``),
i.e. how much the branch adds to the identity path. yolo_tiny has no such block (its
CSP-tiny blocks concatenate new features, none runs beside an identity path).
"""

from __future__ import annotations

import difflib
import operator
from dataclasses import dataclass, field, fields
from typing import Any, Iterable

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from edge_compress.compress.bn import check_recalibrate_bn, recalibrate_bn
from edge_compress.compress.depgraph import trace
from edge_compress.compress.layers import get_parent
from edge_compress.errors import ConfigError, require_known_keys
from edge_compress.models.summary import summarize

CRITERIA = ("l1", "bn_scale")


@dataclass(frozen=True)
class LayerDropConfig:
    """Which blocks to drop: ``blocks`` by ``named_modules()`` name, or the ``num_blocks``
    lowest-scoring removable ones by ``criterion``; exactly one of the two."""

    blocks: tuple[str, ...] = ()
    num_blocks: int = 0
    criterion: str = "l1"
    recalibrate_bn: int = 16        # training batches to re-estimate BatchNorm on afterwards (0: off)

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        if self.criterion not in CRITERIA:
            raise ConfigError(f"layer_drop.criterion='{self.criterion}' is unknown; choose one of: "
                              f"{', '.join(CRITERIA)}")
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks < 0:
            raise ConfigError(f"layer_drop.num_blocks={self.num_blocks!r} must be an integer >= 0")
        check_recalibrate_bn("layer_drop", self.recalibrate_bn)
        if bool(self.blocks) == bool(self.num_blocks):
            raise ConfigError("layer_drop: give exactly one of blocks=(names...) or num_blocks=K (> 0); see "
                              "removable_blocks(model) for the candidates")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["blocks"] = list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None) -> "LayerDropConfig":
        require_known_keys(cls, d, what="layer_drop setting", source=source)
        return cls(**d)


@dataclass(frozen=True)
class LayerDropReport:
    dropped: tuple[str, ...]
    kinds: dict[str, str]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    plan: dict[str, Any] = field(default_factory=dict)
    bn_recalibrated_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"dropped": list(self.dropped), "kinds": dict(self.kinds), "macs_before": self.macs_before,
                "macs_after": self.macs_after, "params_before": self.params_before,
                "params_after": self.params_after, "plan": self.plan,
                "bn_recalibrated_images": self.bn_recalibrated_images}


# ---- finding removable blocks

def _module_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Module name -> the graph nodes run inside its forward (from fx's nn_module_stack)."""
    out: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            out.setdefault(path, []).append(node)
    return out


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _classify(nodes: list[fx.Node]) -> tuple[str | None, str]:
    """(kind, reason): kind 'residual' / 'parallel' when the block can go, else None and why not."""
    inside = set(nodes)
    inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside}
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    tensors_in = [a for a in inputs if _shape(a) is not None]
    if len(tensors_in) != 1 or len(outputs) != 1:
        return None, f"it takes {len(tensors_in)} tensor(s) from outside and hands out {len(outputs)}; a " \
                     "droppable block maps one tensor to one"
    x, y = tensors_in[0], outputs[0]
    if _shape(x) != _shape(y):
        return None, f"its input shape {_shape(x)} and output shape {_shape(y)} differ"
    if y.target in ("add", "__add__") or getattr(y.target, "__name__", "") in ("add", "iadd"):
        if x in y.args:
            return "residual", ""
    if _beside_identity(x, y):
        return "parallel", ""
    return None, "no identity path carries its input past it (its output is neither input + branch nor " \
                 "concatenated beside an untouched piece of its input's split)"


def _beside_identity(x: fx.Node, y: fx.Node) -> bool:
    """``x`` is one piece of a split whose sibling piece is concatenated with ``y`` as it is."""
    if x.target is not operator.getitem:
        return False
    split = x.args[0]
    siblings = {u for u in split.users if u is not x and u.target is x.target}
    for cat in y.users:
        if getattr(cat.target, "__name__", "") in ("cat", "concat"):
            pieces = cat.args[0] if cat.args else cat.kwargs.get("tensors", ())
            if any(p in siblings for p in pieces):
                return True
    return False


def _analysis(model: nn.Module, example: torch.Tensor | None) -> dict[str, tuple[str | None, str]]:
    gm = trace(model)
    spec = getattr(model, "input_spec", None)
    if example is None and spec is None:
        raise ConfigError(f"{type(model).__name__} has no input_spec: pass example=<an (1, C, H, W) input>")
    x = example[:1] if example is not None else torch.zeros(1, spec.channels, spec.height, spec.width)
    was_training = model.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(x)
    model.train(was_training)
    names = dict(model.named_modules())
    out = {}
    for name, nodes in _module_nodes(gm).items():
        if name in names and name:
            out[name] = _classify(nodes)
    for name in names:
        out.setdefault(name, (None, "it is not run by the model's forward"))
    return out


def removable_blocks(model: nn.Module, example: torch.Tensor | None = None) -> dict[str, str]:
    """Every block that can be replaced by ``nn.Identity``: name -> 'residual' or 'parallel'.
    Blocks nested in a removable block are listed too (dropping the outer one drops them)."""
    return {name: kind for name, (kind, _) in _analysis(model, example).items() if kind is not None}


def _score(block: nn.Module, criterion: str) -> float:
    kind = nn.BatchNorm2d if criterion == "bn_scale" else nn.Conv2d
    last = [m for m in block.modules() if isinstance(m, kind)]
    if not last:
        return float("inf")
    return float(last[-1].weight.detach().abs().mean())


def _choose(model: nn.Module, analysis: dict[str, tuple[str | None, str]], config: LayerDropConfig) -> list[str]:
    names = dict(model.named_modules())
    if config.blocks:
        for name in config.blocks:
            if name not in names or not name:
                close = difflib.get_close_matches(name, [n for n in names if n], n=3, cutoff=0.5)
                raise ConfigError(f"layer_drop.blocks names '{name}', which is no module of the model"
                                  + (f" (did you mean {close}?)" if close else "")
                                  + "; see removable_blocks(model)")
            kind, why = analysis[name]
            if kind is None:
                raise ConfigError(f"layer_drop.blocks: '{name}' cannot be dropped: {why}; see "
                                  "removable_blocks(model) for the blocks that can")
        return list(config.blocks)
    removable = [n for n, (kind, _) in analysis.items() if kind is not None]
    top = [n for n in removable if not any(n.startswith(o + ".") for o in removable)]
    if config.num_blocks > len(top):
        raise ConfigError(f"layer_drop.num_blocks={config.num_blocks} but the model has only {len(top)} "
                          f"removable blocks ({top}); lower it")
    return sorted(top, key=lambda n: _score(names[n], config.criterion))[:config.num_blocks]


def restructure(model: nn.Module, plan: dict[str, Any]) -> None:
    """Replace the plan's blocks by ``nn.Identity`` on a freshly built detector."""
    if plan.get("method") != "layer_drop" or not isinstance(plan.get("replaced"), dict):
        raise ConfigError(f"not a layer drop plan (method={plan.get('method')!r}); expected the 'plan' of a "
                          "LayerDropReport.to_dict()")
    names = dict(model.named_modules())
    for name, what in plan["replaced"].items():
        if name not in names or what != "Identity":
            raise ConfigError(f"layer drop plan: cannot replace '{name}' by {what!r} in this model; build the "
                              "same detector the plan was made on")
    for name in plan["replaced"]:
        parent, attr = get_parent(model, name)
        setattr(parent, attr, nn.Identity())


def drop_layers(model: nn.Module, config: LayerDropConfig, example: torch.Tensor | None = None,
                bn_batches: Iterable | None = None) -> LayerDropReport:
    """Replace the chosen blocks of ``model`` by ``nn.Identity`` in place; returns the report with its plan.
    ``bn_batches``: training batches to recalibrate BatchNorm on afterwards (``config.recalibrate_bn`` > 0)."""
    analysis = _analysis(model, example)
    chosen = _choose(model, analysis, config)
    shape = None if example is None else tuple(example[:1].shape)
    before = summarize(model, shape)
    plan = {"method": "layer_drop", "replaced": {name: "Identity" for name in chosen
                                                 if not any(name.startswith(o + ".") for o in chosen)}}
    restructure(model, plan)
    seen = recalibrate_bn(model, bn_batches) if config.recalibrate_bn and bn_batches is not None else 0
    after = summarize(model, shape)
    return LayerDropReport(tuple(chosen), {n: analysis[n][0] for n in chosen}, before.macs, after.macs,
                           before.params, after.params, plan, seen)
