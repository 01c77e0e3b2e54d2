"""Lowered graph files (round trip, tampering, truncation) and the executor (values, freeing, timers)."""

import json
import shutil

import numpy as np
import pytest

from edge_compress.errors import ArtifactError, ConfigError
from edge_compress.kernels import ops
from edge_compress.kernels.executor import Executor, supported_op_types
from edge_compress.kernels.graph import GRAPH_FILE, OP_SPECS, WEIGHTS_FILE, LoweredGraph, Op, load_graph

RNG = np.random.default_rng(1)


def small_graph() -> LoweredGraph:
    """x -> conv 3x3 -> relu -> [maxpool, conv 1x1] -> add -> sigmoid (a diamond: a tensor read twice)."""
    w1, b1 = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32), RNG.standard_normal(8).astype(np.float32)
    w2, b2 = RNG.standard_normal((8, 8, 1, 1)).astype(np.float32), RNG.standard_normal(8).astype(np.float32)
    conv = {"stride": [1, 1], "pads": [1, 1, 1, 1], "dilation": [1, 1], "group": 1}
    op_list = (
        Op("c1", "conv", ("x",), ("a",), conv, {"W": "w1", "B": "b1"}),
        Op("r1", "relu", ("a",), ("r",)),
        Op("p1", "maxpool", ("r",), ("p",), {"kernel": [3, 3], "stride": [1, 1], "pads": [1, 1, 1, 1],
                                              "ceil_mode": 0}),
        Op("c2", "conv", ("r",), ("q",), {**conv, "pads": [0, 0, 0, 0]}, {"W": "w2", "B": "b2"}),
        Op("s1", "add", ("p", "q"), ("s",)),
        Op("g1", "sigmoid", ("s",), ("y",)),
    )
    shapes = {t: (1, 8, 6, 6) for t in "arpqsy"}
    shapes["x"] = (1, 3, 6, 6)
    return LoweredGraph(op_list, {"x": (1, 3, 6, 6)}, {"y": (1, 8, 6, 6)},
                        {"w1": w1, "b1": b1, "w2": w2, "b2": b2}, shapes, {"note": "test"})


def numpy_reference(g: LoweredGraph, x: np.ndarray) -> np.ndarray:
    w = g.weights
    r = ops.relu(ops.conv2d_fp32(x, w["w1"], w["b1"], 1, 1))
    return ops.sigmoid(ops.maxpool(r, (3, 3), (1, 1), (1, 1, 1, 1)) + ops.conv2d_fp32(r, w["w2"], w["b2"]))


def test_every_op_type_has_a_kernel():
    assert supported_op_types() == set(OP_SPECS)


def test_round_trip_runs_the_same(tmp_path):
    g = small_graph()
    g.save(tmp_path)
    g2 = load_graph(tmp_path)
    assert [op.to_dict() for op in g2.ops] == [op.to_dict() for op in g.ops] and g2.meta == {"note": "test"}
    x = RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)
    ex = Executor(g2)
    np.testing.assert_array_equal(ex.run(x), numpy_reference(g, x))
    assert ex.peak_live <= 4    # x freed after c1, a after r1, r after both readers ...


def test_profile_gives_a_median_per_op():
    ex = Executor(small_graph())
    prof = ex.profile(np.zeros((1, 3, 6, 6), np.float32), repeats=5, warmup=1)
    assert list(prof) == ["c1", "r1", "p1", "c2", "s1", "g1"]
    assert all(v > 0 for v in prof.values()) and all(len(v) == 5 for v in ex.timings.values())
    with pytest.raises(ConfigError, match="repeats"):
        ex.profile(np.zeros((1, 3, 6, 6), np.float32), repeats=0)


def test_wrong_input_shape_is_clear():
    with pytest.raises(ConfigError, match=r"shape \(1, 3, 6, 6\), got \(1, 3, 7, 6\)"):
        Executor(small_graph()).run(np.zeros((1, 3, 7, 6), np.float32))


def _edit(folder, fn):
    doc = json.loads((folder / GRAPH_FILE).read_text())
    fn(doc)
    (folder / GRAPH_FILE).write_text(json.dumps(doc))


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["ops"][1].update(type="gelu"), "op 'r1' has unknown type 'gelu'"),
    (lambda d: d["ops"][0]["weights"].update(W="nope"), "op 'c1' .*needs weight 'W'"),
    (lambda d: d["ops"][0]["attrs"].pop("group"), r"op 'c1' \(conv\) lacks attribute\(s\) \['group'\]"),
    (lambda d: d["ops"].reverse(), "reads .* which no earlier op produces"),
    (lambda d: d["ops"][0]["attrs"].update(stride=[1]), r"stride=\[1\] must be a list of integers of length 2"),
    (lambda d: d["ops"][2]["attrs"].update(ceil_mode="yes"), "ceil_mode='yes' must be an integer"),
    (lambda d: d.update(format_version=99), "format_version 99"),
    (lambda d: d.pop("ops"), "missing key 'ops'"),
    (lambda d: d["shapes"].update(a=[1, 9, 6, 6]), "op 'c1' weight W has shape"),
    (lambda d: d.update(weights_sha256="0" * 64), "sha256 .* does not match"),
])
def test_edited_graph_json_is_a_clear_error(tmp_path, edit, match):
    small_graph().save(tmp_path)
    _edit(tmp_path, edit)
    with pytest.raises(ArtifactError, match=match) as e:
        load_graph(tmp_path)
    assert "graph.json" in str(e.value) or "weights.npz" in str(e.value)


def test_truncated_files_are_clear_errors(tmp_path):
    small_graph().save(tmp_path)
    good = tmp_path / "good"
    shutil.copytree(tmp_path, good, ignore=shutil.ignore_patterns("good"))
    text = (tmp_path / GRAPH_FILE).read_text()
    (tmp_path / GRAPH_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match="graph.json is not valid JSON"):
        load_graph(tmp_path)
    data = (good / WEIGHTS_FILE).read_bytes()
    (good / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="weights.npz: sha256"):
        load_graph(good)
    (good / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match="does not exist"):
        load_graph(good)


def test_weights_with_the_wrong_dtype_or_shape_are_rejected(tmp_path):
    g = small_graph()
    bad = dict(g.weights, w1=g.weights["w1"].astype(np.float64))
    with pytest.raises(ArtifactError, match="weight 'w1' of op 'c1' is float64"):
        LoweredGraph(g.ops, g.inputs, g.outputs, bad, g.shapes)
    with pytest.raises(ArtifactError, match=r"op 'c2' weight W has shape \(8, 4, 1, 1\)"):
        LoweredGraph(g.ops, g.inputs, g.outputs, dict(g.weights, w2=np.zeros((8, 4, 1, 1), np.float32)), g.shapes)
    # a consistent edit of both files (new weights, sha256 updated) is still checked op by op
    g.save(tmp_path)
    with open(tmp_path / WEIGHTS_FILE, "wb") as f:
        np.savez(f, **bad)
    from edge_compress.kernels.graph import _sha256

    _edit(tmp_path, lambda d: d.update(weights_sha256=_sha256(tmp_path / WEIGHTS_FILE)))
    with pytest.raises(ArtifactError, match="graph.json: weight 'w1' of op 'c1' is float64"):
        load_graph(tmp_path)
