"""QDQ materialisation: where Q/DQ go, with which parameters, and the layer-name contract."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edge_compress.backends.onnx_export import export_onnx
from edge_compress.errors import ConfigError
from edge_compress.models import create_detector
from edge_compress.quant import QuantConfig, calibrate
from edge_compress.quant.qdq import conv_module_map, float_neighbours, output_convs, quantize_onnx, resolve_layers, \
    tail_nodes


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    torch.manual_seed(0)
    model = create_detector("yolo_tiny", num_classes=3, input_size=64, width_mult=0.25).eval()
    path = export_onnx(model, tmp_path_factory.mktemp("qdq") / "fp32.onnx")
    inputs = [np.random.default_rng(i).random((1, 3, 64, 64), dtype=np.float32) for i in range(3)]
    return model, path, calibrate(path, inputs, QuantConfig(calibrator="minmax"))


def _consts(m):
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


def _qdq_params(m, tensor):
    """(scale, zero point) of the QuantizeLinear that reads ``tensor``."""
    c = _consts(m)
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    return c[q.input[1]], c[q.input[2]]


def test_tail_and_output_convs_are_the_head_plumbing(graph):
    model, path, _ = graph
    m = onnx.load(str(path))
    tail = tail_nodes(m)
    assert {m.graph.node[-1].name} <= tail                                  # the final concat
    assert all(n.op_type in ("Reshape", "Transpose", "Concat", "Slice") for n in m.graph.node if n.name in tail)
    mapping = conv_module_map(model, m)
    assert {mapping[k] for k in ("head.pred16", "head.pred32")} == output_convs(m)


def test_module_map_pairs_every_conv_by_shape(graph):
    model, path, _ = graph
    m = onnx.load(str(path))
    mapping = conv_module_map(model, m)
    shapes = {i.name: tuple(i.dims) for i in m.graph.initializer}
    convs = {n.name: n for n in m.graph.node if n.op_type == "Conv"}
    assert len(mapping) == len(convs) == sum(isinstance(x, torch.nn.Conv2d) for x in model.modules())
    for module, node in mapping.items():
        assert shapes[convs[node].input[1]] == tuple(model.get_submodule(module).weight.shape)


def test_asymmetric_activations_take_the_table_ranges_exactly(graph, tmp_path):
    _, path, table = graph
    r = quantize_onnx(path, table, tmp_path / "q.onnx")
    m = onnx.load(str(r.path))
    onnx.checker.check_model(m, full_check=True)
    lo, hi = table.ranges["images"]
    scale, zp = _qdq_params(m, "images")
    assert zp.dtype == np.uint8
    assert float(scale) == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert int(zp) == round(-lo / ((hi - lo) / 255))
    assert len(r.quantized) + len(r.kept_fp32) == 21 and len(r.kept_fp32) == 2   # the two output convs


def test_weights_are_int8_per_output_channel(graph, tmp_path):
    _, path, table = graph
    m = onnx.load(str(quantize_onnx(path, table, tmp_path / "q.onnx").path))
    c = _consts(m)
    producer = {o: n for n in m.graph.node for o in n.output}
    for conv in (n for n in m.graph.node if n.op_type == "Conv"):
        dq = producer.get(conv.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        w, scale = c[dq.input[0]], c[dq.input[1]]
        assert w.dtype == np.int8 and scale.shape == (w.shape[0],)
        assert np.all(np.abs(w).reshape(w.shape[0], -1).max(1) >= 126)   # symmetric: each channel uses its range


def test_symmetric_activations_for_tensorrt(graph, tmp_path):
    _, path, table = graph
    m = onnx.load(str(quantize_onnx(path, table, tmp_path / "q.onnx", symmetric_activations=True).path))
    c = _consts(m)
    for q in (n for n in m.graph.node if n.op_type == "QuantizeLinear"):
        assert c[q.input[2]].dtype == np.int8 and not np.any(c[q.input[2]])
    lo, hi = table.ranges["images"]
    assert float(_qdq_params(m, "images")[0]) == pytest.approx(max(-lo, hi) / 127, rel=1e-6)


def test_keep_fp32_and_unknown_names(graph, tmp_path):
    model, path, table = graph
    m = onnx.load(str(path))
    mapping = conv_module_map(model, m)
    convs = [n.name for n in m.graph.node if n.op_type == "Conv"]
    keep = resolve_layers(["backbone.stem.0.conv", convs[3]], convs, mapping)
    assert keep == [mapping["backbone.stem.0.conv"], convs[3]]
    r = quantize_onnx(path, table, tmp_path / "q.onnx", keep_fp32=keep)
    assert set(keep) <= set(r.kept_fp32) and not set(keep) & set(r.quantized)
    with pytest.raises(ConfigError, match=r"\['backbone.nope'\] match no layer"):
        resolve_layers(["backbone.nope"], convs, mapping)
    with pytest.raises(ConfigError, match="not in"):
        quantize_onnx(path, table, tmp_path / "q2.onnx", keep_fp32=["/no/such/Conv"])


def _feeding(m, conv: str) -> set[str]:
    """The non-compute nodes on the way into ``conv`` back to the nearest compute producers."""
    producer = {o: n for n in m.graph.node for o in n.output}
    todo, found = [next(n for n in m.graph.node if n.name == conv)], set()
    while todo:
        for i in todo.pop().input:
            p = producer.get(i)
            if p is not None and p.op_type not in ("Conv", "Gemm", "MatMul") and p.name not in found:
                found.add(p.name)
                todo.append(p)
    return found


def test_a_float_conv_keeps_its_neighbours_float(graph, tmp_path, monkeypatch):
    """The activation beside a conv kept in fp32 gets no Q/DQ (a float region stays float: a quantize/
    dequantize pair and a reorder around each of its elementwise ops is what OpenVINO ran slower than the
    whole model in fp32), nor do the nodes that feed it (ONNX Runtime runs an int8 pool feeding a float
    conv in its slow NCHW kernel); an int8 conv's activation stays quantized; with no conv kept, nothing
    but the head's plumbing after the float output convs is left out (what feeds them stays int8)."""
    from edge_compress.quant import qdq

    _, path, table = graph
    m = onnx.load(str(path))
    convs = [n.name for n in m.graph.node if n.op_type == "Conv"]
    keep = convs[3]
    kept_out = next(n for n in m.graph.node if n.name == keep).output[0]
    act = next(n for n in m.graph.node if kept_out in n.input)
    beside = float_neighbours(m, {keep})
    feeding = _feeding(m, keep)
    assert act.op_type == "LeakyRelu" and act.name in beside
    assert feeding and feeding <= beside
    assert all(n.op_type not in ("Conv", "Gemm", "MatMul") for n in m.graph.node if n.name in beside)
    heads = output_convs(m)
    into_heads = set().union(*(_feeding(m, c) for c in heads))
    assert float_neighbours(m, heads) == tail_nodes(m) | into_heads
    assert float_neighbours(m, heads, set()) <= tail_nodes(m)      # all-int8 (quantize_onnx): as before

    def quantized(out):
        q = onnx.load(str(quantize_onnx(path, table, tmp_path / out, keep_fp32=[keep]).path))
        return q, {o: n for n in q.graph.node for o in n.output}

    q, producer = quantized("q.onnx")
    q_act = next(n for n in q.graph.node if n.name == act.name)
    assert producer[q_act.input[0]].name == keep                # the float conv's output, not dequantized
    q_keep = next(n for n in q.graph.node if n.name == keep)
    assert producer[q_keep.input[0]].name in feeding            # a float input, not a dequantized one
    int8_act = [n for n in q.graph.node if n.op_type == "LeakyRelu" and n.name not in beside]
    assert int8_act and all(producer[n.input[0]].op_type == "DequantizeLinear" for n in int8_act)
    monkeypatch.setattr(qdq, "float_neighbours", lambda model, float_compute, fed=None: set())  # no rule
    old, _ = quantized("old.onnx")
    count = [sum(n.op_type == "QuantizeLinear" for n in g.graph.node) for g in (q, old)]
    assert count[0] < count[1]


def test_a_table_from_another_graph_is_refused(graph, tmp_path):
    _, path, table = graph
    partial = type(table)(table.calibrator, table.num_images, {"images": table.ranges["images"]})
    with pytest.raises(ConfigError, match="calibrate this model again"):
        quantize_onnx(path, partial, tmp_path / "q.onnx")
