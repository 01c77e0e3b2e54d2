"""lower(): whole detectors through the kernels vs torch (fp32, sparse), int8 SQNR on real images, the
binary pattern bit-exact against NumPy, and the errors for choices a layer cannot take."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import nn

from edge_compress.data.transforms import normalize
from edge_compress.errors import ConfigError
from edge_compress.export import relative_error, sqnr_db
from edge_compress.kernels.executor import Executor
from edge_compress.kernels.graph import LoweredGraph
from edge_compress.lower import LoweringConfig, lower
from edge_compress.train import load_detector

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "conformance"
FP32_TOL = 1e-4


def run(graph: LoweredGraph, x: np.ndarray) -> np.ndarray:
    ex = Executor(graph)
    return np.concatenate([ex.run(xi[None]) for xi in x])


def torch_out(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def images(synth128):
    """4 val images and 16 train (calibration) images of the generated set, normalised for the 128 px models."""
    from edge_compress.pipeline import open_split

    spec = load_detector(ASSETS / "yolo_tiny.pt").input_spec
    val, train = open_split(synth128, "val", (128, 128)), open_split(synth128, "train", (128, 128))
    return (np.concatenate([normalize(np.asarray(val[i][0])[None], spec) for i in range(4)]),
            [normalize(np.asarray(train[i][0])[None], spec) for i in range(16)])


@pytest.mark.parametrize("family", ["yolo_tiny", "picodet_s", "ssdlite_mbv2", "ssdlite_mbv3"])
def test_fp32_detector_matches_torch(family, images):
    model = load_detector(ASSETS / f"{family}.pt")
    g = lower(model)
    assert set(g.precision().values()) == {"fp32"} and not g.meta["fallbacks"]
    assert relative_error(torch_out(model, images[0]), run(g, images[0])) <= FP32_TOL


@pytest.mark.parametrize("family", ["yolo_tiny", "ssdlite_mbv2"])
def test_int8_detector_sqnr_on_real_images(family, images, tmp_path):
    from edge_compress.backends.onnx_export import export_onnx
    from edge_compress.quant import QuantConfig, calibrate

    model = load_detector(ASSETS / f"{family}.pt")
    path = export_onnx(model, tmp_path / "fp32.onnx")
    table = calibrate(path, images[1], QuantConfig(num_images=16))
    g = lower(path, LoweringConfig(default="int8"), calibration=table)
    assert set(g.precision().values()) == {"int8"}
    if family == "ssdlite_mbv2":   # ReLU6 after each int8 conv is fused into its clamp
        assert not [op for op in g.ops if op.type == "clip"]
        fused = [op for op in g.ops if op.type == "conv_int8" and op.outputs[0].endswith("Clip_output_0")]
        assert fused and all(op.attrs["qmin"] == op.attrs["y_zp"] == 0 for op in fused)
    ref, out = torch_out(model, images[0]), run(g, images[0])
    assert sqnr_db(ref, out) >= 20.0
    # int8 -> int8 convs hand over uint8 directly: bit-identical to the dequantize/quantize round trip
    plain = Executor(g, chain_int8=False)
    np.testing.assert_array_equal(out[:1], plain.run(images[0][:1]))
    assert sqnr_db(ref - ref.mean(0), out - out.mean(0)) >= 14.0   # the image-dependent part


def test_int8_needs_calibration():
    with pytest.raises(ConfigError, match="int8 layers need activation ranges"):
        lower(load_detector(ASSETS / "yolo_tiny.pt"), LoweringConfig(default="int8"))


# --------------------------------------------------------------------------- binary


class BinaryNet(nn.Module):
    """conv -> BN -> hardtanh, then the binary layer as edge_compress.compress.binary exports it:
    sign (0 -> +1), +1 padding, conv at padding 0 with weights sign(W) * alpha[c], BN (folded on export)."""

    def __init__(self, c_mid: int = 72, stride: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.input_spec = SimpleNamespace(channels=3, height=20, width=20)
        self.conv1, self.bn1 = nn.Conv2d(3, c_mid, 3, padding=1, bias=False), nn.BatchNorm2d(c_mid)
        self.bconv, self.bn2 = nn.Conv2d(c_mid, 16, 3, stride=stride, bias=False), nn.BatchNorm2d(16)
        with torch.no_grad():
            self.bconv.weight.copy_(torch.sign(torch.randn(16, c_mid, 3, 3)) * (torch.rand(16, 1, 1, 1) + 0.5))
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2)
                bn.weight.uniform_(-1.5, 1.5), bn.bias.uniform_(-1, 1)
        self.eval()

    def pre_sign(self, x):
        return F.hardtanh(self.bn1(self.conv1(x)))

    def forward(self, x):
        xb = F.pad(torch.where(self.pre_sign(x) >= 0, 1.0, -1.0), (1, 1, 1, 1), value=1.0)
        return self.bn2(self.bconv(xb))


def numpy_binary_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """The same math in plain NumPy int64: signs (x >= 0 -> +1) padded with +1, exact integer
    correlation with sign(w), then float32 alpha[c] * dot + bias."""
    s = np.pad(np.where(x >= 0, 1, -1).astype(np.int64), ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=1)
    ws = np.sign(w).astype(np.int64)
    alpha = np.abs(w).reshape(w.shape[0], -1).max(axis=1).astype(np.float32)
    oc, _, kh, kw = w.shape
    oh, ow = (s.shape[2] - kh) // stride + 1, (s.shape[3] - kw) // stride + 1
    dot = np.zeros((x.shape[0], oc, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = s[:, :, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
            dot += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    return dot.astype(np.float32) * alpha[None, :, None, None] + b[None, :, None, None]


@pytest.mark.parametrize("c_mid,stride", [(72, 2), (64, 1), (5, 1)])
def test_binary_pattern_is_exact_and_matches_torch(c_mid, stride):
    model = BinaryNet(c_mid, stride)
    g = lower(model, LoweringConfig(layers={"bconv": "binary"}))   # a module name, mapped to the ONNX node
    assert [op.type for op in g.ops] == ["conv", "clip", "conv_binary"]   # sign and pad folded into the op
    assert g.precision() == {"/conv1/Conv": "fp32", "/bconv/Conv": "binary"}
    x = torch.randn(2, 3, 20, 20).numpy()
    assert relative_error(torch_out(model, x), run(g, x)) <= 1e-5

    op = g.ops[-1]
    pre = model.pre_sign(torch.from_numpy(x)).detach().numpy()
    only = LoweredGraph((op,), {op.inputs[0]: pre[:1].shape}, {op.outputs[0]: (1, 16) + g.shapes[op.outputs[0]][2:]},
                        {k: g.weights[k] for k in op.weights.values()})
    w_onnx = onnx.numpy_helper.to_array(next(i for i in onnx.load(_export(model)).graph.initializer
                                             if i.dims[:2] == [16, c_mid]))
    ref = numpy_binary_conv(pre, w_onnx, g.weights[op.weights["B"]], stride, 1)
    np.testing.assert_array_equal(run(only, pre), ref)


def _export(model) -> str:
    import tempfile

    from edge_compress.backends.onnx_export import export_onnx

    return str(export_onnx(model, Path(tempfile.mkdtemp(prefix="bin_")) / "m.onnx"))


def test_binary_refused_where_the_pattern_is_absent():
    model = BinaryNet()
    with pytest.raises(ConfigError, match=r"'conv1' \(ONNX node '/conv1/Conv'\) cannot be lowered to binary: "
                                          "its input 'images' is not a binary activation"):
        lower(model, LoweringConfig(layers={"conv1": "binary"}))
    with torch.no_grad():
        model.bconv.weight[3, 0, 0, 0] *= 1.5   # no longer +-alpha in channel 3
    with pytest.raises(ConfigError, match="not \\+-alpha per output channel \\(channel 3"):
        lower(model, LoweringConfig(layers={"bconv": "binary"}))


def test_binarized_zoo_detector_lowers_every_binary_layer(images):
    """The compression step's binary layers (edge_compress.compress.binary) on a trained detector:
    each one becomes an XNOR-popcount op and the whole detector still matches torch."""
    from edge_compress.compress.binary import BinaryConfig, binarize

    model = load_detector(ASSETS / "yolo_tiny.pt")
    binarize(model, BinaryConfig())
    names = [n for n, m in model.named_modules() if type(m).__name__ == "BinaryConv2d"]
    g = lower(model, LoweringConfig(layers={n: "binary" for n in names}))
    assert len(names) > 5 and list(g.precision().values()).count("binary") == len(names)
    assert relative_error(torch_out(model, images[0]), run(g, images[0])) <= FP32_TOL


# --------------------------------------------------------------------------- sparse


def _prune(model) -> dict[str, str]:
    """90% magnitude pruning of two dense convs (CSR) and 2:4 along K of a 1x1 conv; their choices."""
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1
             and m.in_channels % 4 == 0]
    k3 = next(n for n, m in convs if m.kernel_size == (3, 3))
    k1 = [n for n, m in convs if m.kernel_size == (1, 1)]
    mods = dict(model.named_modules())
    with torch.no_grad():
        for name in (k3, k1[0]):
            w = mods[name].weight
            w[w.abs() < w.abs().flatten().quantile(0.9)] = 0
        w = mods[k1[1]].weight
        g = w.reshape(w.shape[0], -1, 4)
        drop = g.abs().argsort(dim=-1)[..., :2]
        g.scatter_(-1, drop, 0.0)
    return {k3: "sparse_csr", k1[0]: "sparse_csr", k1[1]: "sparse_2_4"}


def test_sparse_layers_match_torch(images):
    model = load_detector(ASSETS / "yolo_tiny.pt")
    choice = _prune(model)
    g = lower(model, LoweringConfig(layers=choice))
    got = sorted(v for v in g.precision().values() if v != "fp32")
    assert got == sorted(choice.values())
    csr = [op for op in g.ops if op.type == "conv_sparse_csr"]
    assert all(g.weights[op.weights["values"]].size <= 0.11 * np.prod(op.attrs["shape"]) for op in csr)
    assert relative_error(torch_out(model, images[0]), run(g, images[0])) <= FP32_TOL


def test_sparse_refusals():
    model = load_detector(ASSETS / "ssdlite_mbv2.pt")
    dw = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1)
    with pytest.raises(ConfigError, match=f"'{dw}'.*cannot be lowered to sparse_csr: it is a depthwise conv"):
        lower(model, LoweringConfig(layers={dw: "sparse_csr"}))
    dense = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1
                 and m.in_channels % 4 == 0)
    with pytest.raises(ConfigError, match="do not have the 2:4 pattern"):
        lower(model, LoweringConfig(layers={dense: "sparse_2_4"}))
    stem = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    with pytest.raises(ConfigError, match="3 input channels are not a multiple of 4"):
        lower(model, LoweringConfig(layers={stem: "sparse_2_4"}))


# --------------------------------------------------------------------------- config and names


def test_default_falls_back_with_the_reason_recorded():
    g = lower(load_detector(ASSETS / "ssdlite_mbv2.pt"), LoweringConfig(default="binary"))
    prec = g.precision()
    assert set(prec.values()) == {"fp32"} and set(prec) == set(g.meta["fallbacks"])
    assert all("depthwise" in why or "not a binary activation" in why for why in g.meta["fallbacks"].values())


def test_default_sparse_takes_only_sparse_convs():
    """By default sparse_csr goes only to convs at most half dense; the dense ones say why they stay fp32."""
    model = load_detector(ASSETS / "yolo_tiny.pt")
    pruned = _prune(model)
    g = lower(model, LoweringConfig(default="sparse_csr"))
    assert sum(p == "sparse_csr" for p in g.precision().values()) == len(pruned)
    assert all("nonzero" in why or "depthwise" in why for why in g.meta["fallbacks"].values())


def test_config_validation_and_names():
    cfg = LoweringConfig.from_dict({"default": "fp32", "layers": {"a": "int8", "b": "binary"}})
    assert cfg.layers == (("a", "int8"), ("b", "binary")) and hash(cfg) == hash(LoweringConfig(layers=cfg.layer_map()))
    assert LoweringConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown lowering setting"):
        LoweringConfig.from_dict({"defaults": "fp32"})
    with pytest.raises(ConfigError, match="'sparse' is not a kernel choice; choose one of: fp32, int8, binary"):
        LoweringConfig(layers={"x": "sparse"})
    with pytest.raises(ConfigError, match=r"\['backbone.nope'\] match no layer"):
        lower(load_detector(ASSETS / "yolo_tiny.pt"), LoweringConfig(layers={"backbone.nope": "int8"}))


def test_unsupported_op_names_the_node(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])
    m = helper.make_model(helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], name="head/softmax")],
                                            "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ConfigError, match="ONNX node 'head/softmax' \\(Softmax\\) cannot be lowered.*no kernel"):
        lower(m)
    nodes = [helper.make_node("LeakyRelu", ["x"], ["t"], name="lr"),
             helper.make_node("MaxPool", ["t"], ["y"], name="pool", kernel_shape=[2, 2], auto_pad="SAME_UPPER")]
    m2 = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ConfigError, match="'pool' \\(MaxPool\\).*auto_pad='SAME_UPPER' is not supported"):
        lower(m2)


def test_unnamed_nodes_get_names():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])
    nodes = [helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Sigmoid", ["t"], ["y"])]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    g = lower(m)
    assert [op.name for op in g.ops] == ["Relu_0", "Sigmoid_1"] and [n.name for n in m.graph.node] == ["", ""]
    v = np.linspace(-3, 3, 48, dtype=np.float32).reshape(1, 3, 4, 4)
    np.testing.assert_allclose(Executor(g).run(v), 1 / (1 + np.exp(-np.maximum(v, 0))), rtol=1e-6)
