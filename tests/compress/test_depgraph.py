"""Channel dependency analysis: couplings on hand-made graphs (every rule of depgraph's docstring)
and on the zoo (residual chains, SE gates, depthwise pass-through, ShuffleNet chunk + shuffle)."""

import pytest
import torch
from torch import nn

from edge_compress.compress.depgraph import analyze, channel_groups
from edge_compress.errors import ConfigError
from edge_compress.models import create_detector

X = torch.rand(1, 3, 8, 8)


def groups_of(model):
    return {g.name: g for g in channel_groups(model.eval(), X)}


def members(group):
    return {(m.module, m.dim): m.indices for m in group.members}


class Slices(nn.Module):
    """a (8 ch) -> literal slice [:, 2:6] -> c; b (8 ch) -> size-derived slice [:, c//4:] -> d."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(3, 8, 1)
        self.c, self.d = nn.Conv2d(4, 4, 1), nn.Conv2d(6, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return self.head(torch.cat([self.c(a[:, 2:6]), self.d(b[:, b.shape[1] // 4:])], 1)).flatten(1)


def test_literal_slice_freezes_the_channels_before_its_end_and_derived_slice_couples_its_parts():
    g = groups_of(Slices())
    assert not g["a[0:2]"].prunable and "literal channel bound 6" in g["a[0:2]"].reason
    assert not g["a[2:6]"].prunable and members(g["a[2:6]"])[("c", 1)] == ((0,), (1,), (2,), (3,))
    assert g["a[6:8]"].prunable and g["a[6:8]"].size == 2
    # b[:, 2:] on 8 channels: parts of 2 (the cut at c//4), so channels i, i+2, i+4, i+6 go together
    gb = g["b[0:8]"]
    assert gb.prunable and gb.size == 2
    assert members(gb)[("b", 0)] == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert members(gb)[("d", 1)] == ((0, 2, 4), (1, 3, 5))
    assert not g["head[0:2]"].prunable and "head output conv 'head'" in g["head[0:2]"].reason


class Picks(nn.Module):
    """Channel picks by position (an index, a stride) and splits by a size-derived or a literal size."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.a(x)
        if self.how == "index":
            return self.head(y[:, 3:4].expand(-1, 4, -1, -1) * y[:, 5, None])
        if self.how == "stride":
            return self.head(y[:, ::2])
        if self.how == "split_derived":
            p, q = torch.split(y, y.shape[1] // 2, dim=1)
            return self.head(p + q)
        p, q = torch.split(y, [4, 4], dim=1)
        return self.head(p * q)


def test_position_picks_freeze_and_splits_couple_or_freeze():
    for how in ("index", "stride", "split_literal"):
        g = groups_of(Picks(how))
        assert all(not x.prunable for x in g.values() if ("a", 0) in members(x)), how
    g = groups_of(Picks("split_derived"))["a[0:8]"]
    assert g.prunable and members(g)[("a", 0)] == tuple((i, i + 4) for i in range(4))


class Plumbing(nn.Module):
    """Residual add, SE-style gate, depthwise conv, a spatial (N, 1, H, W) gate, a conv called twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.fc = nn.Conv2d(8, 8, 1)
        self.spatial = nn.Conv2d(8, 1, 1)
        self.shared = nn.Conv2d(8, 4, 1)
        self.head = nn.Conv2d(12, 3, 1)

    def forward(self, x):
        s = self.bn(self.stem(x)).relu()
        r = s + self.pw(self.dw(s))                                # residual: stem, dw, pw are one channel set
        r = r * torch.sigmoid(self.fc(nn.functional.adaptive_avg_pool2d(r, 1)))   # SE gate: fc joins too
        g = r * torch.sigmoid(self.spatial(r))                     # broadcast gate keeps r's channels
        return self.head(torch.cat([self.shared(r) + self.shared(g), g], 1))


def test_residual_gate_depthwise_and_shared_conv():
    g = groups_of(Plumbing())
    main = g["stem[0:8]"]
    assert main.prunable and main.size == 8
    assert set(members(main)) == {("stem", 0), ("bn", 0), ("dw", 0), ("pw", 1), ("pw", 0), ("fc", 1), ("fc", 0),
                                  ("spatial", 1), ("shared", 1), ("head", 1)}
    assert members(main)[("head", 1)] == tuple((4 + i,) for i in range(8))
    assert all(ix == tuple((i,) for i in range(8)) for k, ix in members(main).items() if k != ("head", 1))
    shared = g["shared[0:4]"]                             # one conv called twice: one set of filters
    assert shared.prunable and members(shared) == {("shared", 0): tuple((i,) for i in range(4)),
                                                   ("head", 1): tuple((i,) for i in range(4))}
    assert g["spatial[0:1]"].prunable and g["spatial[0:1]"].size == 1
    assert not g["head[0:3]"].prunable and "head output conv 'head'" in g["head[0:3]"].reason


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.head(self.grouped(self.a(x)))


def test_grouped_conv_freezes_its_input_and_output():
    g = groups_of(Grouped())
    assert not g["a[0:8]"].prunable and "grouped conv 'grouped' (groups=2" in g["a[0:8]"].reason
    after = next(x for x in g.values() if ("head", 1) in members(x))      # the grouped conv's output channels
    assert not after.prunable and "grouped conv 'grouped'" in after.reason


class Shuffle(nn.Module):
    def __init__(self, literal: bool):
        super().__init__()
        self.literal = literal
        self.a = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, 4, h, w) if self.literal else y.view(n, 2, c // 2, h, w)
        return self.head(y.transpose(1, 2).reshape(n, c, h, w))


def test_channel_shuffle_view_couples_the_rows_or_freezes_a_literal_view():
    derived = groups_of(Shuffle(False))["a[0:8]"]
    assert derived.prunable and members(derived)[("a", 0)] == ((0, 4), (1, 5), (2, 6), (3, 7))
    # out = shuffle(a): head input channel 2j + i reads a's channel 4i + j
    assert members(derived)[("head", 1)] == ((0, 1), (2, 3), (4, 5), (6, 7))
    literal = groups_of(Shuffle(True))["a[0:8]"]
    assert not literal.prunable and "literal size" in literal.reason


class Unmodelled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4 * 64, 5)

    def forward(self, x):
        return self.fc(torch.flip(self.a(x), [1]).flatten(1)) + self.fc(self.b(x).flatten(1))


def test_unmodelled_ops_and_linear_layers_freeze_their_inputs():
    g = groups_of(Unmodelled())
    assert "torch.flip" in g["a[0:4]"].reason or "flip" in g["a[0:4]"].reason
    assert not g["b[0:4]"].prunable and ("Linear" in g["b[0:4]"].reason or "output" in g["b[0:4]"].reason)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return y * 2 if y.sum() > 0 else y


def test_untraceable_forward_is_a_clear_error():
    with pytest.raises(ConfigError, match="cannot be traced by torch.fx"):
        channel_groups(Untraceable(), X)


def _zoo(name):
    torch.manual_seed(0)
    return create_detector(name, num_classes=3, input_size=64).eval()


def test_zoo_heads_frozen_and_residual_chain_one_group():
    graph = analyze(_zoo("ssdlite_mbv2"))
    assert graph.head_outputs == {f"head.{i}.pred" for i in range(4)}
    frozen = {m.module for g in graph.groups if not g.prunable for m in g.members if m.dim == 0}
    assert frozen == set(graph.head_outputs)
    chain = next(g for g in graph.groups if any(m.module == "backbone.stage3.0.project.conv" and m.dim == 0
                                                for m in g.members))
    filters = {m.module for m in chain.members if m.dim == 0}
    assert {f"backbone.stage3.{i}.project.conv" for i in range(3)} <= filters and chain.prunable
    assert "backbone.stage4.0.dw.conv" not in filters      # the next block expands first: not coupled
    assert {"backbone.stage3.1.expand.conv", "backbone.stage4.0.expand.conv"} <= {
        m.module for m in chain.members if m.dim == 1}
    assert all(ix == tuple((i,) for i in range(chain.size)) for ix in (m.indices for m in chain.members))


def test_zoo_se_gate_and_depthwise_join_the_expansion_group():
    graph = analyze(_zoo("ssdlite_mbv3"))
    g = next(g for g in graph.groups if any(m.module == "backbone.stage4.1.expand.conv" and m.dim == 0
                                            for m in g.members))
    got = {(m.module, m.dim) for m in g.members}
    block = "backbone.stage4.1."
    assert {(block + "dw.conv", 0), (block + "dw.bn", 0), (block + "se.fc1", 1), (block + "se.fc2", 0),
            (block + "project.conv", 1)} <= got and g.prunable


def test_zoo_shufflenet_units_prune_branch_internals_freely():
    graph = analyze(_zoo("picodet_xs"))
    names = {g.name: g for g in graph.groups}
    g = names["backbone.stage3.1.branch2.pw1.conv[0:72]"]
    assert g.prunable and g.size == 72
    assert {(m.module.rsplit(".", 2)[-2] + "." + m.module.rsplit(".", 1)[-1], m.dim) for m in g.members} >= {
        ("pw1.conv", 0), ("dw.conv", 0), ("se.fc2", 0), ("se.fc1", 1), ("pw2.conv", 1)}
    internal = [g for g in graph.groups if ".branch2.pw1.conv" in g.name and g.prunable]
    assert len(internal) == 3 + 7 + 3                     # every ESNet unit (stage repeats 3, 7, 3)
    assert {m.module for g in graph.groups if not g.prunable for m in g.members if m.dim == 0} == set(
        graph.head_outputs)
