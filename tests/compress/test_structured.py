"""Channel pruning on every zoo family: consistent pruned models, exact costs, coupled channels removed
together (checked against zeroed weights in the unpruned model), criteria, plans, bad input."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from edge_compress.compress.depgraph import analyze
from edge_compress.compress.structured import (ChannelPruneConfig, bn_l1_penalty, prune_channels, removal_plan,
                                               restructure)
from edge_compress.errors import ConfigError
from edge_compress.models import create_detector, summarize

FAMILIES = ("yolo_tiny", "picodet_xs", "ssdlite_mbv2", "ssdlite_mbv3")
SIZE = 64


def detector(name, seed=0):
    """A zoo detector with non-trivial BatchNorm statistics (a fresh one has gamma 1, mean 0)."""
    torch.manual_seed(seed)
    model = create_detector(name, num_classes=3, input_size=SIZE)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def image(seed=1):
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def expected_costs(before: nn.Module, plan: dict, rows) -> tuple[int, int]:
    """Params and MACs recomputed from the unpruned model and the plan's kept channel counts alone."""
    modules = dict(before.named_modules())
    kept = lambda name, side, full: len(plan["modules"].get(name, {}).get(side, range(full)))  # noqa: E731
    params = 0
    for name, m in modules.items():
        own = {n: p.numel() for n, p in m.named_parameters(recurse=False)}
        if isinstance(m, nn.Conv2d):
            out = kept(name, "out", m.out_channels)
            dw = m.groups == m.in_channels == m.out_channels and m.groups > 1
            cin = out if dw else kept(name, "in", m.in_channels)
            per_group_in = 1 if dw else cin // m.groups
            own = {"weight": out * per_group_in * m.kernel_size[0] * m.kernel_size[1],
                   "bias": out if m.bias is not None else 0}
        elif isinstance(m, nn.BatchNorm2d):
            c = kept(name, "out", m.num_features)
            own = {"weight": c, "bias": c}
        params += sum(own.values())
    macs = 0
    for row in rows:
        m = modules[row.name]
        out = kept(row.name, "out", m.out_channels)
        dw = m.groups == m.in_channels == m.out_channels and m.groups > 1
        cin_per_group = 1 if dw else kept(row.name, "in", m.in_channels) // m.groups
        macs += out * row.out_shape[2] * row.out_shape[3] * m.kernel_size[0] * m.kernel_size[1] * cin_per_group
    return params, macs


def depthwise_names(model):
    return {n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels}


CONFIGS = [ChannelPruneConfig("l1", 0.3),
           ChannelPruneConfig("fpgm", 0.5, scope="global"),
           ChannelPruneConfig("bn_scale", 0.5, scope="global", target="flops", round_to=8)]


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_prunes_consistently_and_costs_shrink_as_computed(name):
    head_names = analyze(detector(name)).head_outputs
    for config in CONFIGS:
        model = detector(name)
        x = image()
        reference = create_detector(name, num_classes=3, input_size=SIZE)
        reference.load_state_dict(model.state_dict())
        rows = summarize(reference).layers
        dw_before = depthwise_names(model)
        heads = {n: m.out_channels for n, m in model.named_modules() if n in head_names}
        y0 = model(x)
        report = prune_channels(model, config)
        y = model(x)
        assert y.shape == y0.shape and torch.isfinite(y).all(), config
        after = summarize(model)
        params, macs = expected_costs(reference, report.plan, rows)
        assert (after.params, after.macs) == (params, macs) == (report.params_after, report.macs_after), config
        assert report.macs_after < report.macs_before and report.params_after < report.params_before
        assert depthwise_names(model) == dw_before, "depthwise convs must stay depthwise"
        assert {n: model.get_submodule(n).out_channels for n in heads} == heads, "head outputs intact"
        if config.target == "flops":
            assert 0.40 * report.macs_before <= report.macs_after <= 0.5 * report.macs_before
        if config.round_to > 1:
            assert all(g.kept % 8 == 0 or g.kept == g.size for g in report.groups)


@pytest.mark.parametrize("name", FAMILIES)
def test_taylor_prunes_every_family(name):
    model = detector(name)
    targets = [torch.tensor([[0, 4.0, 4.0, 40.0, 30.0], [2, 20.0, 10.0, 60.0, 60.0]])]
    x = image()
    y0 = model(x)
    report = prune_channels(model, ChannelPruneConfig("taylor", 0.3), taylor_batches=[(image(2), targets)])
    assert model(x).shape == y0.shape and report.macs_after < report.macs_before
    assert report.channels_after == sum(g.size - round(0.3 * g.size) for g in report.groups)


def test_global_channel_ratio_removes_that_fraction_of_prunable_channels():
    model = detector("ssdlite_mbv3")
    report = prune_channels(model, ChannelPruneConfig("l1", 0.4, scope="global"))
    assert report.channels_before - report.channels_after == round(0.4 * report.channels_before)
    assert len({g.kept / g.size for g in report.groups}) > 1, "a global threshold prunes groups unevenly"


def test_layer_ratio_and_min_channels_per_group():
    model = detector("yolo_tiny")
    report = prune_channels(model, ChannelPruneConfig("l1", 0.75, min_channels=12))
    for g in report.groups:
        assert g.kept == min(g.size, max(g.size - round(0.75 * g.size), 12)), g


def _zeroed_reference(model, groups, drops):
    """The unpruned model with every dropped channel's consumers (conv input slices) zeroed: its
    output must equal the pruned model's, so every index of the bookkeeping is checked at once."""
    ref = create_detector(model.name, num_classes=3, input_size=SIZE).double().eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for g, drop in zip(groups, drops):
            for m in g.members:
                if m.dim == 1:
                    idx = [i for k in drop for i in m.indices[k]]
                    ref.get_submodule(m.module).weight[:, idx] = 0
    return ref


@pytest.mark.parametrize("name", FAMILIES)
def test_removing_a_channel_equals_zeroing_its_consumers_in_the_unpruned_model(name):
    model = detector(name).double()
    graph = analyze(model)
    modules = dict(model.named_modules())
    groups = [g for g in graph.groups if g.prunable and g.producers(modules)]
    rng = np.random.default_rng(0)
    drops = [sorted(rng.choice(g.size, size=min(2, g.size - 1), replace=False).tolist()) for g in groups]
    ref = _zeroed_reference(model, groups, drops)
    restructure(model, removal_plan(groups, drops, modules))
    x = image().double()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-9, atol=1e-9)
        assert not torch.allclose(ref(x), _zeroed_reference(detector(name).double(), [], [])(x), atol=1e-6)


def test_yolo_csp_split_and_concat_bookkeeping():
    """conv1's channels i and i + c/2 go together (the x[:, c//2:] split must stay at half); the
    second half feeds conv2; conv4's input concat [x3, x2] maps onto conv3's and conv2's filters."""
    model = detector("yolo_tiny")
    groups = {g.name: g for g in analyze(model).groups}
    c = model.backbone.stage3.conv1.conv.out_channels
    g = groups["backbone.stage3.conv1.conv[0:%d]" % c]
    members = {(m.module, m.dim): m.indices for m in g.members}
    assert members[("backbone.stage3.conv1.conv", 0)] == tuple((i, i + c // 2) for i in range(c // 2))
    assert members[("backbone.stage3.conv2.conv", 1)] == tuple((i,) for i in range(c // 2))
    assert members[("backbone.stage4.conv1.conv", 1)] == tuple((i, i + c // 2) for i in range(c // 2))
    g3 = groups["backbone.stage3.conv3.conv[0:%d]" % (c // 2)]
    assert {(m.module, m.dim): m.indices for m in g3.members}[("backbone.stage3.conv4.conv", 1)] == \
        tuple((i,) for i in range(c // 2))
    g2 = groups["backbone.stage3.conv2.conv[0:%d]" % (c // 2)]
    assert {(m.module, m.dim): m.indices for m in g2.members}[("backbone.stage3.conv4.conv", 1)] == \
        tuple((c // 2 + i,) for i in range(c // 2))


def test_residual_sides_lose_the_same_channels():
    model = detector("ssdlite_mbv2")
    report = prune_channels(model, ChannelPruneConfig("l1", 0.5))
    plan = report.plan["modules"]
    kept = [plan[f"backbone.stage4.{i}.project.conv"]["out"] for i in range(4)]
    assert all(k == kept[0] for k in kept) and len(kept[0]) == 16       # 32 channels at width 0.5, half kept
    assert plan["backbone.stage4.1.expand.conv"]["in"] == kept[0]


def test_plan_round_trip_restructure_and_strict_load():
    for name in ("yolo_tiny", "picodet_xs"):
        model = detector(name)
        report = prune_channels(model, ChannelPruneConfig("fpgm", 0.4, scope="global", round_to=4))
        plan = json.loads(json.dumps(report.to_dict()))["plan"]
        fresh = create_detector(name, num_classes=3, input_size=SIZE).eval()
        restructure(fresh, plan)
        fresh.load_state_dict(model.state_dict(), strict=True)
        x = image()
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_ratio_zero_is_the_identity():
    model = detector("picodet_xs")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = image()
    y0 = model(x)
    report = prune_channels(model, ChannelPruneConfig("l1", 0.0))
    assert report.plan["modules"] == {} and report.macs_after == report.macs_before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["yolo_tiny", "picodet_xs", "ssdlite_mbv3"])
def test_pruned_model_exports_to_onnx_and_runtime_matches_torch(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from edge_compress.backends.onnx_export import export_onnx

    model = detector(name)
    prune_channels(model, ChannelPruneConfig("l1", 0.5, scope="global", target="flops"))
    path = export_onnx(model, tmp_path / "pruned.onnx")
    x = image()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_per_layer_ratios_key_real_convs():
    model = detector("yolo_tiny")
    report = prune_channels(model, ChannelPruneConfig("l1", {"neck.lateral.conv": 0.5, "backbone.stem.1.conv": 0.25}))
    assert model.neck.lateral.conv.out_channels == 32 and model.neck.p4.conv.in_channels == 32 + 128
    assert model.backbone.stem[1].conv.out_channels == 24
    pruned = {g.name for g in report.groups if g.kept < g.size}
    assert pruned == {"neck.lateral.conv[0:64]", "backbone.stem.1.conv[0:32]"}


def test_criteria_remove_the_channel_they_should():
    # l1: the filter with the smallest weights; bn_scale: the zero gamma; fpgm: the filter at the geometric median
    for criterion in ("l1", "bn_scale", "fpgm"):
        model = detector("yolo_tiny")
        conv, bn = model.neck.lateral.conv, model.neck.lateral.bn
        with torch.no_grad():
            if criterion == "l1":
                conv.weight[5] *= 1e-3
            if criterion == "bn_scale":
                bn.weight[5] = 0.0
            if criterion == "fpgm":
                conv.weight[5] = conv.weight[torch.arange(conv.out_channels) != 5].mean(0)
        n = conv.out_channels
        report = prune_channels(model, ChannelPruneConfig(criterion, {"neck.lateral.conv": 1 / n}))
        assert report.plan["modules"]["neck.lateral.conv"]["out"] == [i for i in range(n) if i != 5], criterion


def test_taylor_scores_a_dead_channel_zero_and_needs_batches():
    model = detector("yolo_tiny")
    lateral, p4 = model.neck.lateral.conv, model.neck.p4.conv
    with torch.no_grad():
        p4.weight[:, 7] = 0.0               # channel 7 of the lateral branch no longer reaches anything
    targets = [torch.tensor([[0, 4.0, 4.0, 40.0, 30.0], [2, 20.0, 10.0, 60.0, 60.0]])]
    batches = [(torch.rand(1, 3, SIZE, SIZE), targets) for _ in range(2)]
    report = prune_channels(model, ChannelPruneConfig("taylor", {"neck.lateral.conv": 1 / 64}), taylor_batches=batches)
    assert 7 not in report.plan["modules"]["neck.lateral.conv"]["out"] and lateral.out_channels == 63
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ConfigError, match="taylor_batches"):
        prune_channels(detector("yolo_tiny"), ChannelPruneConfig("taylor", 0.5))


def test_bn_l1_penalty_is_the_slimming_term_and_drives_gammas_down():
    model = detector("yolo_tiny")
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    expected = 1e-3 * sum(float(b.weight.detach().abs().sum()) for b in bns)
    assert abs(float(bn_l1_penalty(model, 1e-3).detach()) - expected) < 1e-6
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = sum(float(b.weight.detach().abs().sum()) for b in bns)
    for _ in range(3):
        opt.zero_grad()
        bn_l1_penalty(model, 1e-2).backward()
        torch.testing.assert_close(bns[0].weight.grad, 1e-2 * bns[0].weight.sign())
        opt.step()
    assert sum(float(b.weight.detach().abs().sum()) for b in bns) < before
    with pytest.raises(ConfigError, match="no affine BatchNorm2d"):
        bn_l1_penalty(nn.Sequential(nn.Conv2d(3, 3, 1)), 1e-4)


def test_bad_input_is_a_clear_error_and_leaves_the_model_alone():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"outside \[0, 1\)"):
            ChannelPruneConfig("l1", bad)
    with pytest.raises(ConfigError, match=r"outside \[0, 1\)"):
        ChannelPruneConfig("l1", {"neck.p4.conv": 1.0})
    with pytest.raises(ConfigError, match="unknown"):
        ChannelPruneConfig("l2", 0.5)
    with pytest.raises(ConfigError, match="scope='layer'"):
        ChannelPruneConfig("l1", {"neck.p4.conv": 0.5}, scope="global")
    with pytest.raises(ConfigError, match="unknown channel_prune setting"):
        ChannelPruneConfig.from_dict({"criterion": "l1", "ratios": 0.5})
    with pytest.raises(ConfigError, match="round_to"):
        ChannelPruneConfig("l1", 0.5, round_to=0)
    cfg = ChannelPruneConfig("l1", {"neck.p4.conv": 0.5}, layers=["neck.p4.conv"])
    again = ChannelPruneConfig.from_dict(cfg.to_dict())
    assert cfg == again and hash(cfg) == hash(again)
    model = detector("yolo_tiny")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="did you mean"):
        prune_channels(model, ChannelPruneConfig("l1", {"neck.p4.cnv": 0.5}))
    with pytest.raises(ConfigError, match="'head.pred16'.*head output conv"):
        prune_channels(model, ChannelPruneConfig("l1", {"head.pred16": 0.5}))
    with pytest.raises(ConfigError, match="'head.pred32', a head output conv"):
        prune_channels(model, ChannelPruneConfig("l1", 0.5, layers=("head.pred32",)))
    grouped = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1, groups=2), nn.Conv2d(8, 2, 1))
    with pytest.raises(ConfigError, match="'0', whose filters cannot be pruned: grouped conv '1' \\(groups=2"):
        prune_channels(grouped, ChannelPruneConfig("l1", 0.5, layers=("0", "1")), example=torch.rand(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="share channels"):
        prune_channels(detector("ssdlite_mbv2"), ChannelPruneConfig(
            "l1", {"backbone.stage4.0.project.conv": 0.5, "backbone.stage4.1.project.conv": 0.25}))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    from edge_compress.compress.sparsity import SparsityConfig, prune_unstructured
    prune_unstructured(model, SparsityConfig("magnitude", 0.5))
    with pytest.raises(ConfigError, match="remove_masks"):
        prune_channels(model, ChannelPruneConfig("l1", 0.5))
    with pytest.raises(ConfigError, match="not a channel pruning plan"):
        restructure(model, {"method": "layer_drop", "replaced": {}})
    with pytest.raises(ConfigError, match="lacks"):
        restructure(model, {"method": "channel_pruning", "modules": {"neck.nothing": {"out": [0]}}})
