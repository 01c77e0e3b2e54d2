"""Ternary weights (TWN): three values per channel as NumPy computes them, STE training, export,
plan round trip, 2-bit size accounting, bad input."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edge_compress.backends.onnx_export import export_onnx
from edge_compress.compress.layers import output_layers
from edge_compress.compress.ternary import (TernaryConfig, TernaryConv2d, TernaryLinear, restructure, ternarize,
                                            ternary_weight)
from edge_compress.errors import ConfigError
from edge_compress.models import create_detector


def detector():
    torch.manual_seed(0)
    return create_detector("yolo_tiny", num_classes=3, input_size=64, width_mult=0.25)


def twn_numpy(w: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """TWN per output channel, written independently in NumPy (float64), and the channels with a
    weight within float32 rounding of delta (there the two float32 means may decide differently)."""
    flat = w.reshape(w.shape[0], -1).astype(np.float64)
    out, tie = np.zeros_like(flat), np.zeros(len(flat), bool)
    for oc, row in enumerate(flat):
        delta = t * np.abs(row).mean()
        big = np.abs(row) > delta
        out[oc] = np.where(big, np.sign(row) * np.abs(row[big]).mean(), 0.0)
        tie[oc] = np.any(np.abs(np.abs(row) - delta) <= 1e-6 * delta)
    return out.reshape(w.shape), tie


@pytest.mark.parametrize("threshold", [0.7, 0.3, 1.2])
def test_three_values_per_channel_as_twn_defines_them(threshold):
    model = detector()
    report = ternarize(model, TernaryConfig(threshold=threshold))
    tern = {n: m for n, m in model.named_modules() if isinstance(m, TernaryConv2d)}
    assert sorted(tern) == sorted(r.name for r in report.layers)
    assert set(output_layers(model)).isdisjoint(tern)                   # head outputs stay float
    full = channels = 0
    for m in tern.values():
        w = m.frozen_weight().numpy()
        channels += w.shape[0]
        for oc in range(w.shape[0]):
            values = np.unique(w[oc])                                   # within {-alpha, 0, +alpha}
            assert len(np.unique(np.abs(values[values != 0]))) == 1 and set(np.sign(values)) <= {-1, 0, 1}
            full += len(values) == 3
        ref, tie = twn_numpy(m.weight.detach().numpy(), threshold)
        assert tie.mean() < 0.05
        np.testing.assert_allclose(w[~tie], ref[~tie], rtol=1e-5, atol=0)
    assert full >= 0.9 * channels                                       # nearly every channel uses all three
    zeros = sum(r.zeros for r in report.layers) / sum(r.weights for r in report.layers)
    assert 0.05 < zeros < 0.95


def test_ste_gradient_reaches_the_latent_weights_and_training_keeps_three_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 25, 3))
    model.input_spec = None
    ternarize(model, TernaryConfig(layers=("0", "3")))
    assert isinstance(model[0], TernaryConv2d) and isinstance(model[3], TernaryLinear)
    x, y = torch.randn(8, 4, 5, 5), torch.randint(0, 3, (8,))
    w_eff = model[0].effective_weight()
    out = model[3](model[2](model[1](nn.functional.conv2d(x, w_eff, model[0].bias, padding=1))))
    (g_eff,) = torch.autograd.grad(nn.functional.cross_entropy(out, y), w_eff)
    nn.functional.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(model[0].weight.grad, g_eff)              # straight through: d/dW = d/dW_t
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model[0].frozen_weight().clone()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    after = model[0].frozen_weight()
    assert not torch.equal(before, after)
    assert all(len(torch.unique(after[oc])) <= 3 for oc in range(after.shape[0]))
    assert torch.equal(after, ternary_weight(model[0].weight.detach(), 0.7))


def test_export_has_ternary_initializers_and_ort_equals_torch(tmp_path):
    model = detector()
    ternarize(model, TernaryConfig())
    path = export_onnx(model, tmp_path / "t.onnx")
    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert all(n.input[1] in inits for n in convs)
    three = sum(all(len(np.unique(inits[n.input[1]][oc])) <= 3 for oc in range(inits[n.input[1]].shape[0]))
                for n in convs)
    assert three == len(convs) - len(output_layers(model))           # BN folded in: still 3 values/channel
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))


def test_plan_round_trip_gives_the_identical_model():
    model = detector()
    plan = ternarize(model, TernaryConfig(threshold=0.5)).to_dict()["plan"]
    fresh = create_detector("yolo_tiny", num_classes=3, input_size=64, width_mult=0.25)
    restructure(fresh, plan)
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))
    assert all(m.threshold == 0.5 for m in fresh.modules() if isinstance(m, TernaryConv2d))


def test_size_accounting_is_two_bits_per_weight_plus_alphas():
    model = detector()
    fp32 = 4 * sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    report = ternarize(model, TernaryConfig())
    n = sum(r.weights for r in report.layers)
    bias = sum(model.get_submodule(r.name).bias.numel() for r in report.layers
               if model.get_submodule(r.name).bias is not None)
    expected = fp32 - 4 * n + sum(-(-2 * r.weights // 8) + 4 * r.out_channels for r in report.layers)
    assert bias == 0 and report.bytes_compressed == expected and report.bytes_fp32 == fp32
    d = report.to_dict()
    assert d["bits_per_weight"] == 2 and d["size_ratio"] == pytest.approx(expected / fp32)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"threshold=0 is outside \(0, 1.5\)"):
        TernaryConfig(threshold=0)
    with pytest.raises(ConfigError, match="unknown ternary setting"):
        TernaryConfig.from_dict({"thresh": 0.7})
    model = detector()
    with pytest.raises(ConfigError, match=r"\['head.pred1'\] match no"):
        ternarize(model, TernaryConfig(layers=("head.pred1",)))
    assert not any(isinstance(m, TernaryConv2d) for m in model.modules())
