"""kernels.ops vs the ONNX reference evaluator on single-node models (the semantics the lowering relies on)."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from edge_compress.errors import ConfigError
from edge_compress.kernels import ops

RNG = np.random.default_rng(0)


def onnx_run(op_type, inputs: dict, consts: dict | None = None, opset: int = 17, **attrs):
    """Run one ONNX node with the reference evaluator: ``inputs`` are graph inputs, ``consts`` initializers."""
    consts = consts or {}
    names = list(inputs) + list(consts)
    node = helper.make_node(op_type, names, ["y"], **attrs)
    graph = helper.make_graph(
        [node], "t", [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, inputs)[0]


def rand(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("c,oc,k,stride,pad,group,dil", [
    (3, 8, 3, 2, 1, 1, 1), (8, 16, 1, 1, 0, 1, 1), (8, 8, 3, 1, 1, 8, 1), (8, 8, 5, 2, 2, 8, 1),
    (8, 16, 3, 1, 1, 8, 1), (8, 12, 3, 1, 2, 2, 2), (6, 6, 3, 2, (0, 1, 1, 0), 1, 1)])
def test_conv2d_fp32_matches_onnx(c, oc, k, stride, pad, group, dil):
    x, w, b = rand(2, c, 11, 9), rand(oc, c // group, k, k), rand(oc)
    pads = [pad] * 4 if np.ndim(pad) == 0 else list(pad)
    onnx_pads = [pads[0], pads[1], pads[2], pads[3]]  # (top, left, bottom, right) = x1b, x2b, x1e, x2e
    ref = onnx_run("Conv", {"x": x}, {"w": w, "b": b}, strides=[stride] * 2, pads=onnx_pads, group=group,
                   dilations=[dil] * 2)
    out = ops.conv2d_fp32(x, w, b, stride, tuple(pads), dil, group)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_elementwise_match_onnx():
    x, y = rand(2, 4, 5, 5), rand(2, 4, 1, 1)
    x[0, 0, 0, :3] = [0.0, -0.0, 3.0]
    np.testing.assert_allclose(ops.add(x, y), onnx_run("Add", {"a": x, "b": y}), rtol=1e-6)
    np.testing.assert_allclose(ops.mul(x, y), onnx_run("Mul", {"a": x, "b": y}), rtol=1e-6)
    np.testing.assert_array_equal(ops.relu(x), onnx_run("Relu", {"x": x}))
    np.testing.assert_array_equal(ops.clip(x * 5, 0.0, 6.0),
                                  onnx_run("Clip", {"x": x * 5}, {"lo": np.float32(0), "hi": np.float32(6)}))
    np.testing.assert_allclose(ops.leaky_relu(x, 0.1), onnx_run("LeakyRelu", {"x": x}, alpha=0.1), rtol=1e-6)
    np.testing.assert_allclose(ops.sigmoid(x * 10), onnx_run("Sigmoid", {"x": x * 10}), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ops.hard_sigmoid(x * 4, 1 / 6, 0.5),
                               onnx_run("HardSigmoid", {"x": x * 4}, alpha=1 / 6, beta=0.5), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ops.hard_swish(x * 4), onnx_run("HardSwish", {"x": x * 4}), rtol=1e-6, atol=1e-6)
    cond = onnx_run("GreaterOrEqual", {"x": x}, {"z": np.float32(0)})
    np.testing.assert_array_equal(ops.binarize(x), np.where(cond, 1.0, -1.0))
    assert ops.binarize(x)[0, 0, 0, 0] == 1.0 and ops.binarize(x)[0, 0, 0, 1] == 1.0   # sign(0) = +1


def test_shape_ops_match_onnx():
    x = rand(1, 6, 4, 4)
    np.testing.assert_array_equal(ops.concat([x, x[:, :2]], 1), onnx_run("Concat", {"a": x, "b": x[:, :2].copy()},
                                                                          axis=1))
    for starts, ends, steps in (([2], [2**63 - 1], [1]), ([0], [3], [1]), ([1], [6], [2])):
        ref = onnx_run("Slice", {"x": x}, {"s": np.array(starts), "e": np.array(ends), "a": np.array([1]),
                                           "st": np.array(steps)})
        np.testing.assert_array_equal(ops.slice_(x, starts, ends, [1], steps), ref)
    shape = np.array([1, 2, 3, 4, 4])
    np.testing.assert_array_equal(ops.reshape(x, shape), onnx_run("Reshape", {"x": x}, {"s": shape}))
    np.testing.assert_array_equal(ops.reshape(x, [0, -1]), onnx_run("Reshape", {"x": x}, {"s": np.array([0, -1])}))
    y = x.reshape(1, 2, 3, 4, 4)
    np.testing.assert_array_equal(ops.transpose(y, [0, 2, 1, 3, 4]), onnx_run("Transpose", {"y": y},
                                                                              perm=[0, 2, 1, 3, 4]))
    pads = np.array([0, 0, 1, 2, 0, 0, 2, 1])
    np.testing.assert_array_equal(ops.pad_constant(x, pads, 1.0),
                                  onnx_run("Pad", {"x": x}, {"p": pads, "v": np.float32(1.0)}, mode="constant"))


@pytest.mark.parametrize("scale", [2, 3])
def test_resize_nearest_matches_onnx(scale):
    x = rand(1, 3, 5, 4)
    ref = onnx_run("Resize", {"x": x}, {"roi": np.zeros(0, np.float32),
                                        "scales": np.array([1, 1, scale, scale], np.float32)},
                   mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    np.testing.assert_array_equal(ops.resize_nearest(x, scale, scale), ref)


@pytest.mark.parametrize("k,s,p,ceil,h", [(2, 2, 0, 0, 8), (2, 2, 0, 1, 7), (3, 2, 1, 0, 9), (3, 2, 1, 1, 10),
                                          (3, 1, 1, 0, 6), (2, 1, 0, 1, 5), (3, 2, 0, 1, 8)])
def test_maxpool_matches_onnx(k, s, p, ceil, h):
    x = rand(2, 3, h, h + 1) - 3.0   # all negative: padding must be -inf, not 0
    ref = onnx_run("MaxPool", {"x": x}, kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, ceil_mode=ceil)
    out = ops.maxpool(x, (k, k), (s, s), (p,) * 4, bool(ceil))
    np.testing.assert_array_equal(out, ref)


def test_global_avgpool_matches_onnx():
    x = rand(2, 5, 7, 3)
    np.testing.assert_allclose(ops.global_avgpool(x), onnx_run("GlobalAveragePool", {"x": x}), rtol=1e-6)


@pytest.mark.parametrize("dtype,lo,hi", [(np.uint8, -1.3, 4.1), (np.int8, -2.0, 2.0), (np.uint8, 0.0, 6.0)])
def test_quantize_dequantize_match_onnx(dtype, lo, hi):
    scale, zp = ops.quant_params(lo, hi, dtype)
    x = np.concatenate([rand(200) * 3, np.array([0.0, lo, hi, 1e3, -1e3], np.float32),
                        (np.arange(-6, 7) + 0.5).astype(np.float32) * np.float32(scale)])  # exact halves
    consts = {"s": np.float32(scale), "z": np.array(zp, dtype)}
    ref_q = onnx_run("QuantizeLinear", {"x": x}, consts, opset=19)
    q = ops.quantize(x, scale, zp, dtype)
    assert q.dtype == ref_q.dtype
    np.testing.assert_array_equal(q, ref_q)
    ref_x = onnx_run("DequantizeLinear", {"q": q}, consts, opset=19)
    np.testing.assert_array_equal(ops.dequantize(q, scale, zp), ref_x)
    assert ops.dequantize(ops.quantize(np.float32(0), scale, zp, dtype), scale, zp) == 0.0   # 0 is exact


def test_bad_arguments_raise():
    with pytest.raises(ConfigError, match="groups"):
        ops.conv2d_fp32(rand(1, 6, 5, 5), rand(4, 4, 3, 3), groups=2)
    with pytest.raises(ConfigError, match="larger"):
        ops.maxpool(rand(1, 1, 2, 2), (3, 3), (1, 1))
    with pytest.raises(ConfigError, match="pads"):
        ops.pad_constant(rand(1, 1, 2, 2), [1, 1])


def test_conv2d_fp32_onnx_node_cases(onnx_node_cases, onnx_conv_attrs):
    """onnx's own Conv node cases (padding, strides, asymmetric pads, auto_pad SAME_LOWER)."""
    cases = onnx_node_cases("test_", "Conv", "conv")
    cases = [c for c in cases if c[1].op_type == "Conv"]
    assert len(cases) >= 6
    for name, node, (x, w, *b), (y,) in cases:
        a = onnx_conv_attrs(node, x.shape, w.shape)
        got = ops.conv2d_fp32(x, w, b[0] if b else None, a["stride"], a["padding"], a["dilation"], a["groups"])
        np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5, err_msg=name)
