"""Low-rank decomposition: exact at full rank, energy rank rule, MACs/params as reported, export."""

import pytest
import torch
from torch import nn

from edge_compress.compress.lowrank import (LowRankConfig, decompose, rank_for_energy, svd_conv1x1, svd_linear,
                                            tucker2_conv)
from edge_compress.errors import ConfigError
from edge_compress.models import create_detector, summarize


def detector(name="yolo_tiny"):
    torch.manual_seed(0)
    return create_detector(name, num_classes=3, input_size=64, width_mult=0.25)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2)])
def test_tucker2_at_full_rank_reproduces_the_conv(stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride, padding, dilation).double()
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    chain = tucker2_conv(conv, 6, 10)
    assert [c.kernel_size for c in chain] == [(1, 1), (3, 3), (1, 1)] and chain[1].stride == (stride, stride)
    torch.testing.assert_close(chain(x), conv(x), rtol=1e-10, atol=1e-10)


def test_svd_at_full_rank_reproduces_1x1_conv_and_linear():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 5, 1, stride=2).double()
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(svd_conv1x1(conv, 5)(x), conv(x), rtol=1e-10, atol=1e-10)
    lin = nn.Linear(8, 5).double()
    v = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(svd_linear(lin, 5)(v), lin(v), rtol=1e-10, atol=1e-10)


def test_reconstruction_error_falls_as_rank_grows():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 12, 3, padding=1).double()
    x = torch.randn(1, 12, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        errors = [float((tucker2_conv(conv, r, r)(x) - conv(x)).norm()) for r in (2, 4, 8, 12)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-9


def test_energy_rank_rule_is_exact():
    s = torch.tensor([3.0, 2.0, 1.0])          # squares 9, 4, 1 of 14
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 9 / 14 + 1e-6) == 2
    assert rank_for_energy(s, 13 / 14) == 2
    assert rank_for_energy(s, 1.0) == 3
    # on a layer: singular values 4, 2, 1, 1, 0... (squares 16, 4, 1, 1 of 22)
    for energy, rank in ((0.9, 2), (20 / 22 - 1e-6, 2), (20 / 22 + 1e-6, 3)):   # float32 weights: not at 1e-16
        report = decompose(_linear_model([4.0, 2.0, 1.0, 1.0, 0, 0, 0, 0]), LowRankConfig(energy, min_channels=1,
                                                                                          layers=("1",)))
        assert [r.ranks for r in report.layers] == [(rank,)], energy


class _Spec:                                   # a detector's input_spec, for an (N, 8, 1, 1) "image"
    channels, height, width = 8, 1, 1


def _linear_model(singular_values):
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(8, 8))
    v, _ = torch.linalg.qr(torch.randn(8, 8))
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 2))
    with torch.no_grad():
        model[1].weight.copy_(u @ torch.diag(torch.tensor(singular_values)) @ v.T)
    model.input_spec = _Spec()
    return model


def test_detector_macs_and_params_drop_as_reported_and_it_exports(tmp_path):
    onnx = pytest.importorskip("onnx")
    from edge_compress.backends.onnx_export import export_onnx

    model = detector().eval()
    x = torch.rand(1, 3, 64, 64)
    before_out, before = model(x), summarize(model)
    report = decompose(model, LowRankConfig(energy=0.5, min_channels=8))
    after = summarize(model)
    assert {r.kind for r in report.layers} == {"tucker2", "svd"}
    assert (report.macs_before, report.params_before) == (before.macs, before.params)
    assert (report.macs_after, report.params_after) == (after.macs, after.params)
    assert after.macs < before.macs and after.params < before.params
    assert before.macs - after.macs == sum(r.macs_before - r.macs_after for r in report.layers)
    assert before.params - after.params == sum(r.params_before - r.params_after for r in report.layers)
    assert all(r.macs_after < r.macs_before for r in report.layers)
    assert "head.pred16" in report.skipped and "backbone.stem.0.conv" in report.skipped
    out = model(x)
    assert out.shape == before_out.shape and torch.isfinite(out).all()
    path = export_onnx(model, tmp_path / "lowrank.onnx")
    graph_out = onnx.load(str(path)).graph.output[0].type.tensor_type.shape.dim
    assert tuple(d.dim_value for d in graph_out) == tuple(out.shape)


def test_grouped_convs_are_skipped_with_the_reason_and_explicit_ranks_apply():
    model = detector("ssdlite_mbv2")
    layers = dict(model.named_modules())
    dw = next(n for n, m in layers.items() if isinstance(m, nn.Conv2d) and m.groups > 1)
    pw = "head.0.pred"                           # a head output conv, decomposed because it is named
    report = decompose(model, LowRankConfig(layers=(dw,), ranks={pw: 2}))
    assert "grouped conv" in report.skipped[dw]
    assert [(r.name, r.kind, r.ranks) for r in report.layers] == [(pw, "svd", (2,))]
    assert isinstance(model.get_submodule(pw), nn.Sequential) and model.get_submodule(pw)[0].out_channels == 2


def test_bad_names_and_values_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean"):
        decompose(detector(), LowRankConfig(ranks={"head.pred_16": 4}))
    with pytest.raises(ConfigError, match="match no"):
        decompose(detector(), LowRankConfig(layers=("neck.nothing",)))
    with pytest.raises(ConfigError, match=r"outside \(0, 1\]"):
        LowRankConfig(energy=0.0)
    with pytest.raises(ConfigError, match="integer >= 1"):
        LowRankConfig(ranks={"a": 0})
    with pytest.raises(ConfigError, match="unknown"):
        LowRankConfig.from_dict({"energy": 0.9, "rank": 3})
    cfg = LowRankConfig(ranks={"a": 2}, layers=["a"])
    assert hash(cfg) == hash(LowRankConfig.from_dict(cfg.to_dict()))
