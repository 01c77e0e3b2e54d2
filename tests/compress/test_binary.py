"""Binary convs (XNOR-Net): +-alpha weights, sign inputs with +1 padding, the exported ONNX pattern,
ORT == torch, clipped STE, plan round trip, size accounting, bad input."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edge_compress.backends.onnx_export import export_onnx
from edge_compress.compress.binary import BinaryConfig, BinaryConv2d, binarize, restructure
from edge_compress.compress.layers import output_layers
from edge_compress.errors import ConfigError
from edge_compress.models import create_detector


def detector(seed=0):
    """A tiny yolo_tiny whose BatchNorms hold non-trivial statistics, as after training (with the
    init's mean 0 / var 1 an integer-valued binary conv output of exactly 0 sits on the sign's
    threshold, where float rounding decides the bit)."""
    torch.manual_seed(seed)
    model = create_detector("yolo_tiny", num_classes=3, input_size=64, width_mult=0.25)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def images(n=2, seed=1):
    return np.random.default_rng(seed).random((n, 3, 64, 64), dtype=np.float32)


def run(model, x):
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def test_weights_are_exactly_plus_minus_alpha_per_output_channel():
    model = detector()
    report = binarize(model, BinaryConfig())
    binary = {n: m for n, m in model.named_modules() if isinstance(m, BinaryConv2d)}
    assert sorted(binary) == sorted(r.name for r in report.layers) and len(binary) >= 8
    for m in binary.values():
        latent = m.weight.detach().double().numpy()
        alpha = np.abs(latent).mean(axis=(1, 2, 3))                  # XNOR-Net eq. 4, in float64
        w = m.binary_weight().detach().double().numpy()
        for oc in range(w.shape[0]):
            values = np.unique(np.abs(w[oc]))
            assert len(values) == 1 and values[0] == pytest.approx(alpha[oc], rel=1e-6)
            assert np.array_equal(np.sign(w[oc]), np.where(latent[oc] >= 0, 1.0, -1.0))
        assert torch.equal(m.frozen_weight(), m.binary_weight().detach())


def test_default_set_leaves_stem_neck_and_head_outputs_untouched():
    model = detector()
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    heads = output_layers(model)
    report = binarize(model, BinaryConfig(keep=("backbone.stage3.conv4.conv",)))
    kept = ["backbone.stem.0.conv", "backbone.stage3.conv4.conv", "neck.p4.conv", *heads]
    for name in kept:
        m = model.get_submodule(name)
        assert type(m) is nn.Conv2d and torch.equal(m.weight, before[name]), name
        assert name in report.skipped
    assert "stem" in report.skipped["backbone.stem.0.conv"]
    assert all(r.name.startswith("backbone.") for r in report.layers)
    assert {r.name for r in report.layers} == {n for n, m in before.items() if n.startswith("backbone.")} - set(kept)


def test_one_layer_matches_a_numpy_sign_conv_with_plus_one_padding():
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 4, 3, stride=2, padding=1, bias=True)
    b = BinaryConv2d.from_conv(conv).eval()
    x = torch.randn(1, 5, 7, 7)
    x[0, 0, 0, :3] = 0.0                                          # sign(0) = +1
    out = b(x).detach().double().numpy()
    xs = np.pad(np.where(x.numpy() >= 0, 1.0, -1.0), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=1.0)
    w = conv.weight.detach().double().numpy()
    wb = np.where(w >= 0, 1.0, -1.0) * np.abs(w).mean(axis=(1, 2, 3))[:, None, None, None]
    ref = np.zeros((1, 4, 4, 4))
    for i in range(4):
        for j in range(4):
            patch = xs[0, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
            ref[0, :, i, j] = (wb * patch).sum(axis=(1, 2, 3)) + conv.bias.detach().double().numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def _binary_patterns(path):
    """Conv nodes fed by Where(GreaterOrEqual(x, 0), 1, -1) [-> Pad(constant 1.0)], with their pads."""
    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    found = {}
    for conv in (n for n in g.node if n.op_type == "Conv"):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
        node, pads = producer.get(conv.input[0]), None
        if node is not None and node.op_type == "Pad":
            assert {a.name: a.s for a in node.attribute}.get("mode", b"constant") == b"constant"
            assert float(inits[node.input[2]]) == 1.0
            pads = inits[node.input[1]].tolist()
            node = producer.get(node.input[0])
        if node is None or node.op_type != "Where":
            continue
        cond = producer[node.input[0]]
        assert cond.op_type == "GreaterOrEqual" and float(inits[cond.input[1]]) == 0.0
        assert float(inits[node.input[1]]) == 1.0 and float(inits[node.input[2]]) == -1.0
        assert attrs.get("pads", [0, 0, 0, 0]) == [0, 0, 0, 0] and conv.input[1] in inits
        found[conv.name] = (pads, inits[conv.input[1]])
    return found


def test_export_yields_where_pad_conv_and_ort_equals_torch(tmp_path):
    model = detector()
    report = binarize(model, BinaryConfig())
    path = export_onnx(model, tmp_path / "b.onnx")
    found = _binary_patterns(path)
    assert len(found) == len(report.layers)
    layers = {r.name: model.get_submodule(r.name) for r in report.layers}
    assert sorted(p for p, _ in found.values() if p) == sorted(
        [0, 0, m.one_padding[0], m.one_padding[1], 0, 0, m.one_padding[0], m.one_padding[1]]
        for m in layers.values() if any(m.one_padding))
    for _, w in found.values():               # BN folded in: still one |value| per output channel
        a = np.abs(w.reshape(w.shape[0], -1))
        assert np.allclose(a, a[:, :1], rtol=1e-6)
    x = images()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = np.concatenate([sess.run(None, {"images": x[i:i + 1]})[0] for i in range(len(x))])
    ref = run(model, x)
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))


def test_clipped_straight_through_gradients():
    torch.manual_seed(0)
    b = BinaryConv2d.from_conv(nn.Conv2d(3, 2, 3, padding=1)).train()
    x = (torch.randn(1, 3, 5, 5) * 2).requires_grad_(True)
    b(x).sum().backward()
    # d out / d sign(x) is the sum of the weights touching x; the STE passes it where |x| <= 1 only
    xs = torch.where(x >= 0, 1.0, -1.0).detach().requires_grad_(True)
    padded = nn.functional.pad(xs, (1, 1, 1, 1), value=1.0)
    nn.functional.conv2d(padded, b.binary_weight().detach(), b.bias).sum().backward()
    torch.testing.assert_close(x.grad, xs.grad * (x.detach().abs() <= 1))
    assert (x.grad[x.detach().abs() > 1] == 0).all() and b.weight.grad is not None and b.weight.grad.abs().sum() > 0


def test_plan_round_trip_gives_the_identical_model():
    model = detector()
    plan = binarize(model, BinaryConfig()).to_dict()["plan"]
    with torch.no_grad():                      # a step of fine-tuning: latent weights move
        for m in model.modules():
            if isinstance(m, BinaryConv2d):
                m.weight.add_(0.01 * torch.randn_like(m.weight))
    fresh = create_detector("yolo_tiny", num_classes=3, input_size=64, width_mult=0.25)
    restructure(fresh, plan)
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = images(1)
    assert np.array_equal(run(fresh, x), run(model, x))


def test_size_accounting_is_one_bit_per_weight_plus_alphas():
    model = detector()
    fp32 = 4 * sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    report = binarize(model, BinaryConfig())
    binary = sum(r.weights for r in report.layers)
    expected = fp32 - 4 * binary + sum(-(-r.weights // 8) + 4 * r.out_channels for r in report.layers)
    assert report.bytes_fp32 == fp32 and report.bytes_compressed == expected
    d = report.to_dict()
    assert d["size_ratio"] == pytest.approx(expected / fp32) and d["size_ratio"] < 1
    assert all(0.0 <= v["input_plus_fraction"] <= 1.0 for v in d["layers"].values())


def test_bad_input_is_a_clear_error():
    model = detector()
    with pytest.raises(ConfigError, match=r"\['backbone.nope'\] match no"):
        binarize(model, BinaryConfig(layers=("backbone.nope",)))
    with pytest.raises(ConfigError, match="head output conv"):
        binarize(model, BinaryConfig(layers=("head.pred16",)))
    with pytest.raises(ConfigError, match="keep"):
        BinaryConfig(layers=("a",), keep=("b",))
    with pytest.raises(ConfigError, match="unknown binary setting"):
        BinaryConfig.from_dict({"layer": ["x"]})
    picodet = create_detector("picodet_s", num_classes=3, input_size=64)
    dw = next(n for n, m in picodet.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    with pytest.raises(ConfigError, match="groups="):
        binarize(picodet, BinaryConfig(layers=(dw,)))
    assert not any(isinstance(m, BinaryConv2d) for m in model.modules())


def test_the_lowering_runs_every_binarised_layer_on_the_xnor_kernel(tmp_path):
    """The exported pattern is what edge_compress.lower reads: every binarised layer lowers to the
    XNOR-popcount conv and the lowered graph agrees with ONNX Runtime on the same file."""
    from edge_compress.kernels.executor import Executor
    from edge_compress.lower.config import LoweringConfig
    from edge_compress.lower.lower import lower

    model = detector()
    report = binarize(model, BinaryConfig())
    path = export_onnx(model, tmp_path / "b.onnx")
    lowered = lower(str(path), LoweringConfig(default="binary"))
    binary_nodes = {n for n, p in lowered.precision().items() if p == "binary"}
    assert binary_nodes == set(_binary_patterns(path)) and len(binary_nodes) == len(report.layers)
    x = images(1)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    assert np.max(np.abs(Executor(lowered).run(x) - ref)) <= 1e-5 * np.max(np.abs(ref))
