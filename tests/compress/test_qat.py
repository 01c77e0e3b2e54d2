"""QAT: exact BN folding, weight/activation fake-quant grids and EMA ranges, STE, mixed precision,
QAT ranges -> the int8 ONNX Runtime artifact (agrees with the fake-quant model, calibration.json holds
the learned ranges), plan round trip, size accounting, bad input."""

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from edge_compress.compress.qat import (ActivationFakeQuant, QATConfig, QATConv2d, activation_quant_off,
                                        conv_bn_pairs, convert_qat, fake_quant_weight, fold_bn, learned_ranges,
                                        prepare_qat, qat_calibration, restructure, fold_pairs)
from edge_compress.compress.layers import output_layers
from edge_compress.data.transforms import normalize
from edge_compress.errors import ConfigError
from edge_compress.export import export_model, sqnr_db
from edge_compress.models import create_detector
from edge_compress.pipeline import open_split
from edge_compress.quant import QuantConfig, calibration_images
from edge_compress.runtime import open_runner


def detector(class_names=None):
    """A tiny yolo_tiny whose BatchNorms hold non-trivial statistics (as after training)."""
    torch.manual_seed(0)
    kw = {"class_names": class_names} if class_names else {"num_classes": 3}
    model = create_detector("yolo_tiny", input_size=64, width_mult=0.25, **kw)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def forward(model, x):
    with torch.no_grad():
        return model.eval()(torch.as_tensor(x)).numpy()


def test_bn_folding_is_exact():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, groups=2).double(), nn.BatchNorm2d(6).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    ref = bn(conv(x))
    fold_bn(conv, bn)
    torch.testing.assert_close(conv(x), ref, rtol=1e-12, atol=1e-12)
    model = detector()
    x = torch.rand(2, 3, 64, 64)
    before = forward(model, x)
    pairs = conv_bn_pairs(model)
    assert len(pairs) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 19
    fold_pairs(model, pairs, fold_weights=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    np.testing.assert_allclose(forward(model, x), before, rtol=1e-5, atol=1e-5 * np.abs(before).max())


@pytest.mark.parametrize("bits, per_channel", [(8, True), (4, True), (8, False), (2, True)])
def test_weight_fake_quant_is_the_symmetric_integer_grid(bits, per_channel):
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.linspace(0.1, 2, 6).view(-1, 1, 1, 1)
    q = fake_quant_weight(w, bits, per_channel).double().numpy()
    qmax = 2 ** (bits - 1) - 1
    wn = w.double().numpy()
    amax = np.abs(wn).reshape(6, -1).max(axis=1) if per_channel else np.full(6, np.abs(wn).max())
    scale = (amax / qmax)[:, None, None, None]
    k = q / scale
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)                  # integers ...
    assert np.abs(np.round(k)).max() == qmax                               # ... in [-qmax, qmax], max reached
    np.testing.assert_allclose(q, np.clip(np.round(wn / scale), -qmax, qmax) * scale, rtol=1e-5, atol=1e-6)
    wg = w.clone().requires_grad_(True)
    fake_quant_weight(wg, bits, per_channel).sum().backward()
    assert torch.equal(wg.grad, torch.ones_like(w))                        # straight through


def test_activation_range_is_an_ema_of_batch_min_max_with_clipped_ste():
    q = ActivationFakeQuant(bits=8, ema=0.1).train()
    batches = [torch.tensor([[-1.0, 2.0]]), torch.tensor([[0.5, 4.0]]), torch.tensor([[-3.0, 1.0]])]
    lo, hi = -1.0, 2.0
    for i, b in enumerate(batches):
        q(b)
        if i:
            lo, hi = lo + 0.1 * (float(b.min()) - lo), hi + 0.1 * (float(b.max()) - hi)
    assert (float(q.lo), float(q.hi)) == pytest.approx((lo, hi), rel=1e-6)
    q.eval()
    x = torch.linspace(-3, 5, 101).requires_grad_(True)
    y = q(x)
    assert (float(q.lo), float(q.hi)) == pytest.approx((lo, hi), rel=1e-6)  # eval learns nothing
    scale = (hi - lo) / 255
    zp = round(-lo / scale)
    ref = (np.clip(np.round(x.detach().numpy() / scale) + zp, 0, 255) - zp) * scale
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    inside = (x.detach() >= lo - scale / 2) & (x.detach() <= hi + scale / 2)
    assert torch.equal(x.grad[inside], torch.ones(int(inside.sum()))) and (x.grad[~inside] == 0).all()
    with activation_quant_off(nn.Sequential(q)):
        assert torch.equal(q(x.detach()), x.detach())


def test_layer_selection_mixed_precision_and_outputs():
    model = detector()
    heads = output_layers(model)
    report = prepare_qat(model, QATConfig(per_layer_bits={"neck.p4.conv": 4}, keep_fp32=("backbone.stem.0.conv",)))
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, QATConv2d)}
    assert heads.isdisjoint(wrapped) and "backbone.stem.0.conv" not in wrapped and len(wrapped) == 18
    assert wrapped["neck.p4.conv"].weight_bits == 4 and {m.weight_bits for m in wrapped.values()} == {4, 8}
    assert report.to_dict()["layers"]["neck.p4.conv"]["weight_bits"] == 4
    k = wrapped["neck.p4.conv"].quantized_weight().detach()
    assert all(len(torch.unique(k[oc])) <= 15 for oc in range(k.shape[0]))
    model = detector()
    prepare_qat(model, QATConfig(quantize_outputs=True))
    assert all(isinstance(model.get_submodule(n), QATConv2d) for n in heads)


def _train(model, teacher, x, steps=6):
    """A few steps of output distillation from the fp32 teacher (QAT's usual fine-tune objective)."""
    opt = torch.optim.Adam(model.parameters(), 1e-4)
    model.train()
    for step in range(steps):
        b = x[(4 * step) % len(x):][:4]
        with torch.no_grad():
            target = teacher(b)
        loss = (model(b) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def data(tiny_synth):
    return tiny_synth


@pytest.mark.parametrize("per_layer_bits", [None, {"backbone.stage4.conv1.conv": 4, "neck.p4.conv": 3}])
def test_qat_ranges_and_weights_reach_the_int8_ort_artifact(data, tmp_path, per_layer_bits):
    ds = open_split(data, "train", (64, 64))
    model = detector(ds.class_names)
    teacher = copy.deepcopy(model)
    x = torch.from_numpy(np.concatenate([normalize(i[None], model.input_spec) for i in calibration_images(ds, 16)]))
    prepare_qat(model, QATConfig(per_layer_bits=per_layer_bits))
    _train(model, teacher, x)
    learned = learned_ranges(model)
    xv = x[:8].numpy()
    qat_out, fp32_out = forward(model, xv), forward(teacher, xv)
    table = qat_calibration(model, None, [x[i:i + 1].numpy() for i in range(8)])
    assert table.notes["source"] == "qat" and table.notes["matched_fraction"] == 1.0
    convert_qat(model)
    art = export_model(model, "onnxruntime", tmp_path / "a", quant=QuantConfig(num_images=8), calibration=table,
                       data=data)
    q = art.manifest["quantization"]
    assert q["calibration_source"] == "qat" and q["kept_fp32"] == ["/head/pred16/Conv", "/head/pred32/Conv"]
    saved = json.loads((art.path / q["calibration_file"]).read_text())
    assert saved["notes"]["matched"] == len(learned) == 19
    for tensor, quantizers in saved["notes"]["tensors"].items():
        lo = min(learned[n][0] for n in quantizers)
        hi = max(learned[n][1] for n in quantizers)
        assert saved["ranges"][tensor] == pytest.approx([lo, hi], rel=1e-6, abs=1e-12), tensor
    int8_out = open_runner(art)(xv)
    # SQNR on outputs centred per head channel: the raw outputs' large constant part (prior biases)
    # would inflate it (~72 dB raw vs ~48 dB centred here)
    c = qat_out.mean(axis=(0, 1), keepdims=True)
    agree = sqnr_db(qat_out - c, int8_out - c)
    assert agree >= 25 and sqnr_db(qat_out, int8_out) >= agree
    if per_layer_bits:   # the 3/4-bit weights travel: the artifact is nearer the QAT model than the fp32 one is
        assert agree > sqnr_db(qat_out - c, fp32_out - c) + 3


def test_plan_round_trip_gives_the_identical_model():
    model = detector()
    plan = prepare_qat(model, QATConfig(per_layer_bits={"neck.p4.conv": 5})).to_dict()["plan"]
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 3, 64, 64))                                    # ranges learned
    fresh = create_detector("yolo_tiny", num_classes=3, input_size=64, width_mult=0.25)
    restructure(fresh, json.loads(json.dumps(plan)))
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(1, 3, 64, 64)
    assert np.array_equal(forward(fresh, x), forward(model, x))
    conversion = convert_qat(model)
    fresh = create_detector("yolo_tiny", num_classes=3, input_size=64, width_mult=0.25)
    restructure(fresh, conversion.to_dict()["plan"])
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert np.array_equal(forward(fresh, x), forward(model, x))
    assert not any(isinstance(m, QATConv2d) for m in model.modules())


def test_size_accounting_is_weight_bits_plus_scales():
    model = detector()
    fp32 = 4 * sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    report = prepare_qat(model, QATConfig(per_layer_bits={"neck.p4.conv": 4}))
    assert report.bytes_fp32 == fp32
    expected = 4 * sum(t.numel() for k, t in model.state_dict().items()
                       if t.is_floating_point() and not any(k.startswith(r.name + ".") for r in report.layers))
    expected += sum(-(-r.weight_bits * r.weights // 8) + 4 * r.out_channels + 4 * r.out_channels  # scales + bias
                    for r in report.layers)
    assert report.bytes_compressed == expected and report.to_dict()["size_ratio"] < 0.3


def test_bad_input_is_a_clear_error(data, tmp_path):
    for bad in (1, 9, 4.0):
        with pytest.raises(ConfigError, match=r"must be an integer in 2..8"):
            QATConfig(weight_bits=bad)
    with pytest.raises(ConfigError, match=r"per_layer_bits\['a'\]=16"):
        QATConfig(per_layer_bits={"a": 16})
    with pytest.raises(ConfigError, match="unknown qat setting"):
        QATConfig.from_dict({"bits": 8})
    model = detector()
    with pytest.raises(ConfigError, match=r"\['neck.p9.conv'\] match no"):
        prepare_qat(model, QATConfig(per_layer_bits={"neck.p9.conv": 4}))
    with pytest.raises(ConfigError, match="stay fp32"):
        prepare_qat(model, QATConfig(per_layer_bits={"head.pred16": 4}))
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())    # nothing changed
    with pytest.raises(ConfigError, match="no QATConv2d"):
        convert_qat(model)
    prepare_qat(model, QATConfig())
    with pytest.raises(ConfigError, match="no trained QAT quantizer"):
        qat_calibration(model, None, [np.zeros((1, 3, 64, 64), np.float32)])
    with pytest.raises(ConfigError, match="pass quant=QuantConfig"):
        export_model(detector(), "onnxruntime", tmp_path / "a", calibration=object(), data=data)
    assert not (tmp_path / "a").exists()
