"""Channel dependency analysis for structured pruning: which channels must go together.

Torch-Pruning 1.6 fails on two of our three families (it cannot follow yolo_tiny's
``x[:, c // 2:]`` CSP split, and it divides by zero on PicoDet's chunk + shuffle), so
the analysis is our own, in the spirit of its DepGraph (Fang et al., CVPR 2023):

1. trace the detector with ``torch.fx.symbolic_trace`` (every zoo forward traces as is);
2. run the traced graph once on an example image and give every channel of every
   4-D activation a *slot* id. A conv makes fresh slots for its output channels; a
   BatchNorm, an activation, a pool or a resize passes the slots through; a depthwise
   conv passes them through too (it must lose exactly its input's channels);
3. tensor plumbing (``cat``, slicing, ``chunk``/``split``, ``view``/``transpose``/
   ``reshape`` as in a channel shuffle) is not modelled op by op: the op itself is run
   on a *label tensor* holding each element's slot id, so the index bookkeeping is the
   op's own. A result that is 4-D with one label per channel is a channel map again;
   anything else (the flattened detection output) is not, and whatever reaches the
   model output is unprunable;
4. residual adds and elementwise gates (SE: ``x * hardsigmoid(fc2(...))``) merge the
   slots of both operands position by position (union-find). A channel slice whose
   bounds come from the tensor's size (``x[:, c // 2:]``, ``chunk(2)``) stays right
   after pruning only if every part loses the same number of channels: its parts are
   merged position by position. A slice with literal bounds keeps the channels before
   its end unprunable (their removal would shift it);
5. slots that share a module channel (a shared conv called twice) are merged; every
   merged class is one prunable *channel*, and classes touching the same set of
   (module, dim) pairs form one :class:`ChannelGroup`.

Unprunable, with the reason: the model input, the head's output convs (their output
channels are the detections, found by ``edge_compress.compress.layers.output_layers``),
anything reshaped into the output, grouped convs other than depthwise, Linear layers
and any op not listed here (conservative: its inputs are frozen). A reshape that keeps
the channels whole is taken to size itself from the tensor, as the zoo's do; one with a
literal channel count would break after pruning, which ``prune_channels`` catches by
applying every plan to a copy of the model first.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from edge_compress.compress.layers import output_layers
from edge_compress.errors import ConfigError

PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.Sigmoid, nn.Tanh,
                nn.GELU, nn.Mish, nn.Hardtanh, nn.ELU, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d,
                nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample)
PASS_FUNCTIONS = {F.interpolate, F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.leaky_relu, F.gelu,
                  F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.sigmoid,
                  torch.relu, torch.tanh, F.dropout}
PASS_METHODS = {"sigmoid", "relu", "tanh", "clamp", "clip", "contiguous", "float", "to"}
ELEMENTWISE = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
               torch.div, "add", "sub", "mul", "div"}
INDEX_FUNCTIONS = {torch.cat, torch.concat, torch.flatten, torch.reshape, torch.permute, torch.transpose,
                   torch.chunk, torch.split, torch.squeeze, torch.unsqueeze, operator.getitem}
INDEX_METHODS = {"view", "reshape", "permute", "transpose", "flatten", "chunk", "split", "unsqueeze", "squeeze",
                 "expand", "view_as", "reshape_as"}


@dataclass(frozen=True)
class Member:
    """One module dimension a group prunes: ``dim`` 0 = output channels (a conv's filters and
    bias, a depthwise conv's channels, a BatchNorm's features), 1 = a conv's input channels.
    ``indices[k]`` are the indices along ``dim`` that go with the group's channel ``k``
    (usually one; two where a size-derived split pairs channels)."""

    module: str
    dim: int
    indices: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together: removing the group's channel ``k`` removes
    ``m.indices[k]`` along ``m.dim`` of every member ``m``."""

    name: str
    size: int
    members: tuple[Member, ...]
    reason: str = ""                 # why it cannot be pruned; empty when it can

    @property
    def prunable(self) -> bool:
        return not self.reason

    def producers(self, modules: dict[str, nn.Module]) -> list[str]:
        """The convs whose output channels (filters) this group removes."""
        return [m.module for m in self.members if m.dim == 0 and isinstance(modules[m.module], nn.Conv2d)]


@dataclass(frozen=True)
class DependencyGraph:
    """The analysis of one model: its channel groups, head output convs and, per conv, the
    output size ``(oh, ow)`` of every call on the example (for MAC counts)."""

    groups: tuple[ChannelGroup, ...]
    head_outputs: frozenset[str]
    conv_calls: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)


class _Slots:
    """Union-find over channel slots, with the unprunable ones and the module channels they touch."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.reason: dict[int, str] = {}
        self.members: dict[tuple[str, int, int], list[int]] = {}

    def fresh(self, n: int, reason: str = "") -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        if reason:
            self.reason.update({s: reason for s in range(start, start + n)})
        return torch.arange(start, start + n, dtype=torch.float64)

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def freeze(self, labels: torch.Tensor, reason: str) -> None:
        for s in labels.unique().long().tolist():
            self.reason.setdefault(s, reason)

    def touch(self, labels: torch.Tensor, module: str, dim: int) -> None:
        for i, s in enumerate(labels.long().tolist()):
            self.members.setdefault((module, dim, i), []).append(s)


def _has_tensor(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    return isinstance(value, torch.Tensor)


def _full_labels(value: Any, lab: Any) -> Any:
    """Labels shaped like ``value`` (a tensor or a tuple of them); other values as they are."""
    if isinstance(value, (tuple, list)) and isinstance(lab, (tuple, list)):
        return type(value)(_full_labels(v, l) for v, l in zip(value, lab))
    if not isinstance(value, torch.Tensor):
        return value
    if isinstance(lab, torch.Tensor) and lab.dim() == 1 and value.dim() == 4:
        return lab.view(1, -1, 1, 1).expand(value.shape).contiguous()
    return lab


def _channel_labels(t: torch.Tensor) -> torch.Tensor | None:
    """A 4-D label tensor with one label per channel -> that (C,) vector, else None."""
    if t.dim() != 4 or t.numel() == 0:
        return None
    flat = t.transpose(0, 1).reshape(t.shape[1], -1)
    return flat[:, 0].clone() if bool((flat == flat[:, :1]).all()) else None


class _LabelRunner(fx.Interpreter):
    """Runs the traced graph on the example and, beside every value, its channel labels:
    a (C,) slot vector for a 4-D channel map, a full label tensor otherwise, None for non-tensors."""

    def __init__(self, gm: fx.GraphModule, slots: _Slots):
        super().__init__(gm)
        self.slots, self.labels, self.conv_calls = slots, {}, {}
        self.modules = dict(gm.named_modules())

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.labels[n] = self._label(n, value)
        return value

    # ---- helpers
    def _lab(self, a: Any) -> Any:
        return self.labels.get(a) if isinstance(a, fx.Node) else None

    def _full(self, a: Any) -> Any:
        """The argument as a label tensor of its value's shape (non-tensors: their value)."""
        if not isinstance(a, fx.Node):
            return a
        return _full_labels(self.env[a], self.labels.get(a))

    def _as_labels(self, t: Any) -> Any:
        if isinstance(t, (tuple, list)):
            return type(t)(self._as_labels(x) for x in t)
        if not isinstance(t, torch.Tensor):
            return None
        ch = _channel_labels(t)
        return ch if ch is not None else t

    def _tensor_labels(self, n: fx.Node) -> list[torch.Tensor]:
        out = []
        for a in n.all_input_nodes:
            lab = self.labels.get(a)
            for t in (lab if isinstance(lab, (tuple, list)) else (lab,)):
                if isinstance(t, torch.Tensor):
                    out.append(t)
        return out

    def _unknown(self, n: fx.Node, value: Any, what: str) -> Any:
        """An op we do not model: freeze its inputs, give its outputs fresh frozen slots."""
        reason = f"used by {what} (node '{n.name}'), which channel pruning does not model"
        for lab in self._tensor_labels(n):
            self.slots.freeze(lab, reason)
        return self._fresh_like(value, reason)

    def _fresh_like(self, value: Any, reason: str) -> Any:
        if isinstance(value, (tuple, list)):
            return type(value)(self._fresh_like(v, reason) for v in value)
        if not isinstance(value, torch.Tensor):
            return None
        if value.dim() == 4:
            return self.slots.fresh(value.shape[1], reason)
        return self.slots.fresh(1, reason).expand(value.shape).clone() if value.numel() else value.double()

    # ---- dispatch
    def _label(self, n: fx.Node, value: Any) -> Any:
        if n.op == "placeholder":
            return self._fresh_like(value, "model input channels")
        if n.op == "output":
            for lab in self._tensor_labels(n):
                self.slots.freeze(lab, "reaches the detection output")
            return None
        if n.op == "get_attr":
            return self._fresh_like(value, f"constant '{n.target}'")
        if n.op == "call_module":
            return self._module(n, self.modules[n.target], value)
        if not _has_tensor(value):
            return None                                   # shapes and their arithmetic: no channels
        target = n.target
        if target in ELEMENTWISE:
            return self._elementwise(n, value)
        if target in PASS_FUNCTIONS or (n.op == "call_method" and target in PASS_METHODS):
            return self._pass(n, value, str(target))
        if target in INDEX_FUNCTIONS or (n.op == "call_method" and target in INDEX_METHODS):
            return self._index(n, value)
        return self._unknown(n, value, f"{n.op} {getattr(target, '__name__', target)}")

    def _module(self, n: fx.Node, module: nn.Module, value: Any) -> Any:
        if isinstance(module, nn.Conv2d):
            return self._conv(n, module, value)
        if isinstance(module, nn.BatchNorm2d):
            lab = self._pass(n, value, n.target)
            if isinstance(lab, torch.Tensor) and lab.dim() == 1:
                self.slots.touch(lab, n.target, 0)
            return lab
        if isinstance(module, PASS_MODULES):
            return self._pass(n, value, n.target)
        return self._unknown(n, value, f"module '{n.target}' ({type(module).__name__})")

    def _pass(self, n: fx.Node, value: Any, what: str) -> Any:
        """Channel-wise ops: the output carries the first argument's channel labels."""
        lab = self._lab(n.args[0]) if n.args else None
        if (isinstance(lab, torch.Tensor) and lab.dim() == 1 and isinstance(value, torch.Tensor)
                and value.dim() == 4 and value.shape[1] == lab.numel()):
            return lab
        return self._unknown(n, value, what)

    def _conv(self, n: fx.Node, conv: nn.Conv2d, value: torch.Tensor) -> torch.Tensor:
        lab = self._lab(n.args[0])
        self.conv_calls.setdefault(n.target, []).append(tuple(value.shape[2:]))
        if not (isinstance(lab, torch.Tensor) and lab.dim() == 1):
            return self._unknown(n, value, f"conv '{n.target}' on a tensor without per-channel labels")
        if conv.groups == 1:
            self.slots.touch(lab, n.target, 1)
            out = self.slots.fresh(conv.out_channels)
            self.slots.touch(out, n.target, 0)
            return out
        if conv.groups == conv.in_channels == conv.out_channels:      # depthwise: channels pass through
            self.slots.touch(lab, n.target, 0)
            return lab
        reason = f"grouped conv '{n.target}' (groups={conv.groups}, not depthwise)"
        self.slots.freeze(lab, reason)
        return self.slots.fresh(conv.out_channels, reason)

    def _elementwise(self, n: fx.Node, value: Any) -> Any:
        args = [a for a in n.args[:2] if isinstance(a, fx.Node) and isinstance(self.env[a], torch.Tensor)]
        tensors = [self.labels[a] for a in args]
        maps = all(self.env[a].dim() == 4 and lab.dim() == 1 for a, lab in zip(args, tensors))
        if not maps or not isinstance(value, torch.Tensor) or value.dim() != 4:
            return self._unknown(n, value, f"elementwise {getattr(n.target, '__name__', n.target)} on non-channel maps")
        wide = [lab for lab in tensors if lab.numel() == value.shape[1]]
        if len(wide) == 2:                                # residual add / gate: both sides are one channel
            for a, b in zip(wide[0].long().tolist(), wide[1].long().tolist()):
                self.slots.union(a, b)
        if not wide:
            return self._unknown(n, value, "a broadcast that widens channels")
        return wide[0]

    def _index(self, n: fx.Node, value: Any) -> Any:
        """Plumbing: run the op itself on label tensors, after coupling the parts of a channel split."""
        src = n.args[0] if n.args else None
        src_lab = self._lab(src)
        if isinstance(src_lab, torch.Tensor) and src_lab.dim() == 1:
            self._couple_split(n, src, src_lab.numel())
            if n.target in ("view", "reshape", torch.reshape) and isinstance(value, torch.Tensor):
                self._couple_reshape(n, src, value)
        args = fx.node.map_aggregate(n.args, self._full)
        kwargs = fx.node.map_aggregate(n.kwargs, self._full)
        if n.op == "call_method":
            result = getattr(args[0], n.target)(*args[1:], **kwargs)
        else:
            result = n.target(*args, **kwargs)
        return self._as_labels(result)

    # ---- channel splits
    def _couple_reshape(self, n: fx.Node, src: fx.Node, value: torch.Tensor) -> None:
        """A view that factors the channels, ``(N, C, H, W) -> (N, g, C // g, H, W)`` (channel shuffle):
        the pruned view stays the same map when every outer row loses the same inner positions, so
        positions equal modulo the innermost factor are merged; a literal innermost factor freezes them."""
        lab, c = self.labels[src].long().tolist(), len(self.labels[src])
        shape, k, prod = tuple(value.shape), 1, 1
        while k < len(shape) and prod < c:
            prod, k = prod * shape[k], k + 1
        if prod != c or k <= 2 or shape[0] != self.env[src].shape[0]:
            return                                       # channels not factored (kept, or merged away)
        sizes = _reshape_sizes(n)
        inner = sizes[k - 1] if len(sizes) == len(shape) else None
        if not isinstance(inner, fx.Node) and inner != -1:
            self.slots.freeze(torch.tensor(lab, dtype=torch.float64),
                              f"factored by '{n.name}' with a literal size (pruning would break the view)")
            return
        part = shape[k - 1]
        for i in range(part, c):
            self.slots.union(lab[i % part], lab[i])

    def _couple_split(self, n: fx.Node, src: fx.Node, c: int) -> None:
        """Make a channel split stay right after pruning (see the module docstring, item 4)."""
        dim = _split_dim(n)
        if dim is None or dim % 4 != 1:
            return
        bounds, derived = _split_bounds(n, c, self.env)
        if bounds is None:
            return
        lab = self.labels[src].long().tolist()
        if derived:
            part = c
            for b in bounds:
                part = _gcd(part, b)
            for i in range(part, c):
                self.slots.union(lab[i % part], lab[i])
        else:
            end = min(max(bounds, default=0), c)
            reason = f"before a literal channel bound {end} of '{n.name}' (pruning them would shift it)"
            self.slots.freeze(torch.tensor(lab[:end], dtype=torch.float64), reason)


def _reshape_sizes(n: fx.Node) -> list:
    sizes = n.args[1:]
    return list(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)) else list(sizes)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _split_dim(n: fx.Node) -> int | None:
    if n.target in ("chunk", "split", torch.chunk, torch.split):
        return int(n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0))
    if n.target is operator.getitem and isinstance(n.args[1], tuple):
        idx = n.args[1]
        if len(idx) >= 2 and idx[0] == slice(None) and idx[1] != slice(None):
            return 1
    return None


def _split_bounds(n: fx.Node, c: int, env: dict) -> tuple[list[int] | None, bool]:
    """Inner cut points of a channel split on ``c`` channels, and whether they follow the size."""
    value = lambda a: env[a] if isinstance(a, fx.Node) else a  # noqa: E731
    if n.target in ("chunk", torch.chunk):
        k = int(value(n.args[1] if len(n.args) > 1 else n.kwargs["chunks"]))
        size = -(-c // k)
        return [b for b in range(size, c, size)], c % k == 0
    if n.target in ("split", torch.split):
        spec = value(n.args[1] if len(n.args) > 1 else n.kwargs["split_size_or_sections"])
        sizes = [spec] * (-(-c // spec)) if isinstance(spec, int) else list(spec)
        cuts = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
        arg = n.args[1] if len(n.args) > 1 else n.kwargs["split_size_or_sections"]
        return cuts, isinstance(arg, fx.Node) and isinstance(spec, int) and c % spec == 0
    s = n.args[1][1]
    if not isinstance(s, slice):
        return [c], False                               # an index or index list picks channels by position
    start, stop, step = (value(s.start) or 0), value(s.stop), value(s.step)
    if step not in (None, 1):
        return [c], False                               # strided: every channel position matters
    start, stop = start % c if start < 0 else start, (c if stop is None else (stop % c if stop < 0 else min(stop, c)))
    derived = all(isinstance(b, fx.Node) or b is None for b in (s.start, s.stop)) and (start, stop) != (0, c)
    return [b for b in (start, stop) if 0 < b < c], derived


# ---- building the groups

def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with a clear error when the forward is not traceable."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:   # noqa: BLE001 - any tracing failure becomes one clear error
        raise ConfigError(f"{type(model).__name__}.forward cannot be traced by torch.fx ({type(exc).__name__}: "
                          f"{exc}); channel pruning needs a traceable forward (no data-dependent Python "
                          "control flow on tensor values)") from exc


def _example(model: nn.Module, example: torch.Tensor | None) -> torch.Tensor:
    if example is not None:
        return example[:1].detach()
    spec = getattr(model, "input_spec", None)
    if spec is None:
        raise ConfigError(f"{type(model).__name__} has no input_spec: pass example=<an (1, C, H, W) input>")
    p = next(model.parameters(), None)
    return torch.zeros(1, spec.channels, spec.height, spec.width, dtype=p.dtype if p is not None else None)


def analyze(model: nn.Module, example: torch.Tensor | None = None) -> DependencyGraph:
    """Trace ``model``, propagate channel labels on ``example`` (default: a zero image of the
    model's input spec) and return its channel groups, prunable or not (with the reason)."""
    x = _example(model, example)
    heads = frozenset(output_layers(model, x))
    gm, slots = trace(model), _Slots()
    runner = _LabelRunner(gm, slots)
    was_training = model.training
    gm.eval()
    with torch.no_grad():
        runner.run(x)
    model.train(was_training)
    for (name, dim, _), ss in slots.members.items():
        if name in heads and dim == 0:       # the more telling reason wins over "reaches the output"
            slots.reason.update({s: f"output channels of the head output conv '{name}' (detection outputs)"
                                 for s in ss})
        for s in ss[1:]:
            slots.union(ss[0], s)
    groups = _groups(slots, list(dict(model.named_modules())))
    calls = {k: tuple(v) for k, v in runner.conv_calls.items()}
    return DependencyGraph(tuple(groups), heads, calls)


def channel_groups(model: nn.Module, example: torch.Tensor | None = None) -> list[ChannelGroup]:
    """The model's channel groups (see :func:`analyze`)."""
    return list(analyze(model, example).groups)


def _groups(slots: _Slots, module_order: list[str]) -> list[ChannelGroup]:
    classes: dict[int, dict[tuple[str, int], list[int]]] = {}
    reasons: dict[int, str] = {}
    for (name, dim, idx), ss in slots.members.items():
        root = slots.find(ss[0])
        classes.setdefault(root, {}).setdefault((name, dim), []).append(idx)
    for s, why in sorted(slots.reason.items()):
        reasons.setdefault(slots.find(s), why)
    order = {name: i for i, name in enumerate(module_order)}
    by_signature: dict[tuple, list[int]] = {}
    for root, touched in classes.items():      # frozen channels apart: they must not freeze their neighbours
        key = tuple(sorted(touched, key=lambda md: (order[md[0]], md[1])))
        by_signature.setdefault((key, root in reasons), []).append(root)
    groups = []
    for (key, _), roots in by_signature.items():
        roots.sort(key=lambda r: min(classes[r][key[0]]))
        members = tuple(Member(name, dim, tuple(tuple(sorted(classes[r][(name, dim)])) for r in roots))
                        for name, dim in key)
        why = next((reasons[r] for r in roots if r in reasons), "")
        groups.append(ChannelGroup("", len(roots), members, why))
    groups.sort(key=lambda g: (order[g.members[0].module], g.members[0].indices[0]))
    return _named(groups)


def _named(groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """Name a group after its first member, with the index range when the member spans several groups."""
    out, seen = [], set()
    for g in groups:
        first = g.members[0]
        idx = [i for ix in first.indices for i in ix]
        name = base = f"{first.module}[{min(idx)}:{max(idx) + 1}]"
        k = 1
        while name in seen:
            name, k = f"{base}#{k}", k + 1
        seen.add(name)
        out.append(ChannelGroup(name, g.size, g.members, g.reason))
    return out
