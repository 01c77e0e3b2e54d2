"""Unstructured pruning: exact sparsity, global threshold, LAMP, N:M pattern, masks through training."""

import copy

import pytest
import torch
from torch import nn

from edge_compress.compress.layers import output_layers
from edge_compress.compress.sparsity import (SparsityConfig, baked_copy, lamp_scores, masks, prune_unstructured,
                                             remove_masks)
from edge_compress.errors import ConfigError
from edge_compress.models import create_detector


def detector(name="yolo_tiny"):
    torch.manual_seed(0)
    return create_detector(name, num_classes=3, input_size=64, width_mult=0.25)


def test_layer_scope_gives_exact_sparsity_per_layer_and_keeps_head_outputs_dense():
    model = detector()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = prune_unstructured(model, SparsityConfig("magnitude", 0.6))
    heads = output_layers(model)
    assert heads == {"head.pred16", "head.pred32"}
    assert set(report.skipped) == heads
    for row in report.layers:
        assert row.zeros == round(0.6 * row.numel), row
        keep = masks(model)[row.name]
        w = original[row.name + ".weight"].abs()
        assert w[~keep].max() <= w[keep].min()          # the smallest |w| went
    for name in heads:
        assert (model.get_submodule(name).weight != 0).all()
    baked = copy.deepcopy(model)
    remove_masks(baked)
    assert report.params_total == sum(p.numel() for p in baked.parameters())
    assert report.params_nonzero == sum(int((p != 0).sum()) for p in baked.parameters())


def test_magnitude_prunes_the_smallest_weights():
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.1, -5.0, 0.3, 2.0], [-0.2, 0.05, 4.0, -1.0]]))
    model = nn.Sequential(lin)
    prune_unstructured(model, SparsityConfig("magnitude", 0.5, layers=("0",)))
    assert masks(model)["0"].tolist() == [[False, True, False, True], [False, False, True, True]]


def test_global_scope_uses_one_threshold_over_layers():
    model = nn.Sequential(nn.Linear(4, 1, bias=False), nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
        model[1].weight.copy_(torch.tensor([[10.0, 20.0, 30.0, 0.5]]))
    report = prune_unstructured(model, SparsityConfig("magnitude", 0.5, scope="global", layers=("0", "1")))
    assert masks(model)["0"].tolist() == [[False, False, False, True]]   # 0.5, 1, 2, 3 are the 4 smallest
    assert masks(model)["1"].tolist() == [[True, True, True, False]]
    assert [r.zeros for r in report.layers] == [3, 1] and report.sparsity == 0.5


def test_lamp_scores_match_a_hand_computation():
    w = torch.tensor([[3.0, -1.0], [2.0, 0.5]])
    # ascending |w|: 0.5, 1, 2, 3; squares 0.25, 1, 4, 9; tails 14.25, 14, 13, 9
    expected = torch.tensor([[9 / 9, 1 / 14], [4 / 13, 0.25 / 14.25]], dtype=torch.float64)
    torch.testing.assert_close(lamp_scores(w), expected)


def test_lamp_global_threshold_prunes_lowest_scores_and_keeps_each_layers_largest():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, -1.0], [2.0, 0.5]]))      # scores 1, 1/14, 4/13, 1/57
        model[1].weight.copy_(torch.tensor([[0.1, 0.2], [0.3, 0.4]]))      # scores .01/.3, .04/.29, .09/.25, 1
    prune_unstructured(model, SparsityConfig("lamp", 0.5, scope="global", layers=("0", "1")))
    # the 4 lowest of {1, .0714, .3077, .0175, .0333, .1379, .36, 1}: .0175, .0333, .0714, .1379
    assert masks(model)["0"].tolist() == [[True, False], [True, False]]
    assert masks(model)["1"].tolist() == [[False, False], [True, True]]


def test_nm_pattern_is_exact_in_every_group():
    model = detector("picodet_s")
    report = prune_unstructured(model, SparsityConfig("nm", 0.5))
    assert report.layers and all("multiple of m=4" in why or "head" in why for why in report.skipped.values())
    for name, keep in masks(model).items():
        groups = keep.movedim(1, -1).reshape(-1, 4)
        assert (groups.sum(1) == 2).all(), name
        w = model.get_submodule(name).weight.detach().abs().movedim(1, -1).reshape(-1, 4)
        assert ((w != 0).sum(1) <= 2).all()


def test_masks_survive_training_steps_and_bake_in():
    model = detector()
    prune_unstructured(model, SparsityConfig("magnitude", 0.5))
    before = masks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(torch.rand(2, 3, 64, 64)).square().mean().backward()
        opt.step()
    for name, keep in before.items():
        assert (model.get_submodule(name).weight[~keep] == 0).all(), name
    state = model.state_dict()
    assert any(k.endswith("parametrizations.weight.original") for k in state)
    clone = detector()
    prune_unstructured(clone, SparsityConfig("magnitude", 0.5))
    clone.load_state_dict(state)                   # a pruned checkpoint reloads into a pruned model
    removed = remove_masks(model)
    assert set(removed) == set(before) and masks(model) == {}
    assert not any("parametrizations" in k for k in model.state_dict())
    for name, keep in before.items():
        w = model.get_submodule(name).weight
        assert isinstance(w, nn.Parameter) and (w[~keep] == 0).all()
        torch.testing.assert_close(w, clone.get_submodule(name).weight)


def test_pruning_twice_replaces_the_mask():
    model = detector()
    prune_unstructured(model, SparsityConfig("magnitude", 0.3))
    first = masks(model)
    report = prune_unstructured(model, SparsityConfig("magnitude", 0.6))
    for row in report.layers:
        assert row.zeros == round(0.6 * row.numel)
        assert not (masks(model)[row.name] & ~first[row.name]).any()   # pruned weights stay pruned


def test_per_layer_ratios_and_bad_names():
    model = detector()
    report = prune_unstructured(model, SparsityConfig("magnitude", 0.2, per_layer={"head.pred16": 0.75}))
    rows = {r.name: r for r in report.layers}
    assert rows["head.pred16"].zeros == round(0.75 * rows["head.pred16"].numel)
    with pytest.raises(ConfigError, match=r"head\.pred16"):
        prune_unstructured(detector(), SparsityConfig("magnitude", 0.5, per_layer={"head.pred_16": 0.5}))
    with pytest.raises(ConfigError, match="match no"):
        prune_unstructured(detector(), SparsityConfig("magnitude", 0.5, layers=("backbone.nope",)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="random", sparsity=0.5), "choose one of"),
    (dict(method="magnitude", sparsity=1.0), r"outside \[0, 1\)"),
    (dict(method="magnitude", sparsity=0.5, scope="net"), "choose one of"),
    (dict(method="lamp", sparsity=0.5), "scope='global'"),
    (dict(method="nm", sparsity=0.6), "sparsity=0.5"),
    (dict(method="magnitude", sparsity=0.5, scope="global", per_layer={"a": 0.1}), "scope='layer'"),
    (dict(method="magnitude", sparsity=0.5, per_layer={"a": -0.1}), "per_layer"),
])
def test_config_errors_name_value_and_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        SparsityConfig(**kwargs)


def test_config_is_hashable_and_round_trips():
    cfg = SparsityConfig("magnitude", 0.5, layers=["a"], per_layer={"b": 0.1})
    assert hash(cfg) == hash(SparsityConfig.from_dict(cfg.to_dict())) and cfg == SparsityConfig.from_dict(cfg.to_dict())
    with pytest.raises(ConfigError, match="unknown"):
        SparsityConfig.from_dict({"method": "nm", "sparsity": 0.5, "ratio": 1})


def test_masked_detector_exports_with_its_zeros(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from edge_compress.backends.onnx_export import export_onnx

    model = detector()
    prune_unstructured(model, SparsityConfig("magnitude", 0.5))
    graph = onnx.load(str(export_onnx(model, tmp_path / "pruned.onnx"))).graph
    zeros = sorted(float((numpy_helper.to_array(i) == 0).mean()) for i in graph.initializer if len(i.dims) == 4)
    assert zeros == [0.0, 0.0] + [0.5] * (len(zeros) - 2)      # the two head output convs stay dense


def test_default_layers_need_a_detector():
    with pytest.raises(ConfigError, match="name the layers"):
        prune_unstructured(nn.Sequential(nn.Linear(2, 2)), SparsityConfig("magnitude", 0.5))


def test_baked_copy_holds_the_zeros_as_plain_weights_and_leaves_the_original_masked():
    model = detector().eval()
    prune_unstructured(model, SparsityConfig(method="magnitude", sparsity=0.6))
    baked = baked_copy(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), baked(x))
    assert masks(baked) == {} and len(masks(model)) > 0
    for name, mask in masks(model).items():
        w = baked.get_submodule(name).weight
        assert type(baked.get_submodule(name)) is nn.Conv2d
        assert torch.count_nonzero(w[~mask]) == 0
        assert torch.equal(w[mask], model.get_submodule(name).parametrizations.weight.original[mask])
