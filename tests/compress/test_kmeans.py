"""k-means weight sharing: Lloyd against a brute-force NumPy k-means, weights stay on centroids
through SGD, centroid gradients are sums, export, plan round trip, size accounting, bad input."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from edge_compress.backends.onnx_export import export_onnx
from edge_compress.compress.kmeans import (KMeansConfig, KMeansConv2d, cluster_weights, lloyd, restructure)
from edge_compress.compress.layers import output_layers
from edge_compress.errors import ConfigError
from edge_compress.models import create_detector


def detector():
    torch.manual_seed(0)
    return create_detector("yolo_tiny", num_classes=3, input_size=64, width_mult=0.25)


def brute_kmeans(w, k, iterations=50):
    """Lloyd with an explicit distance matrix (argmin, first index on ties), linear init."""
    c = np.linspace(w.min(), w.max(), k)
    for _ in range(iterations + 1):
        idx = np.argmin(np.abs(w[:, None] - c[None, :]), axis=1)
        new = np.array([w[idx == j].mean() if np.any(idx == j) else c[j] for j in range(k)])
        if np.array_equal(new, c):
            break
        c = new
    return c, idx


@pytest.mark.parametrize("k", [2, 4, 16])
def test_lloyd_matches_a_brute_force_kmeans_and_is_a_fixed_point(k):
    w = np.random.default_rng(k).standard_normal(3000) ** 3          # heavy tails, as trained weights
    c, idx = lloyd(w, k)
    rc, ridx = brute_kmeans(w, k)
    np.testing.assert_allclose(c, rc, rtol=1e-12, atol=1e-12)
    assert np.array_equal(idx, ridx)
    assert np.array_equal(idx, np.argmin(np.abs(w[:, None] - c[None, :]), axis=1))   # nearest centroid
    for j in range(k):
        if np.any(idx == j):
            assert c[j] == pytest.approx(w[idx == j].mean(), rel=1e-12, abs=1e-15)    # mean of its members


def test_weights_stay_on_centroids_through_sgd_and_the_centroids_move():
    model = detector()
    report = cluster_weights(model, KMeansConfig(bits=4))
    clustered = {n: m for n, m in model.named_modules() if isinstance(m, KMeansConv2d)}
    assert sorted(clustered) == sorted(r.name for r in report.layers)
    assert set(output_layers(model)).isdisjoint(clustered)
    index0 = {n: m.shared.index.clone() for n, m in clustered.items()}
    cent0 = {n: m.shared.centroids.detach().clone() for n, m in clustered.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.rand(2, 3, 64, 64)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    for n, m in clustered.items():
        w = m.weight.detach()
        c = m.shared.centroids.detach()
        assert len(c) == 16 and set(torch.unique(w).tolist()) <= set(c.tolist())
        assert torch.equal(w, c[m.shared.index.long()]) and torch.equal(m.shared.index, index0[n])
    moved = [n for n in clustered if not torch.equal(clustered[n].shared.centroids.detach(), cent0[n])]
    assert len(moved) == len(clustered)


def test_a_centroid_gradient_is_the_sum_of_its_weights_gradients():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    model = nn.Sequential(conv)
    model.input_spec = None
    cluster_weights(model, KMeansConfig(bits=3, layers=("0",)))
    x = torch.randn(2, 4, 6, 6)
    w = model[0].weight.detach().clone().requires_grad_(True)          # the same weight as a free tensor
    nn.functional.conv2d(x, w, model[0].bias, padding=1).pow(2).sum().backward()
    model(x).pow(2).sum().backward()
    expected = np.bincount(model[0].shared.index.numpy().ravel(), w.grad.double().numpy().ravel(), 8)
    np.testing.assert_allclose(model[0].shared.centroids.grad.double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_error_falls_with_bits_and_per_layer_bits_apply():
    errors = []
    for bits in (2, 4, 6):
        report = cluster_weights(detector(), KMeansConfig(bits=bits))
        errors.append(sum(r.rel_error for r in report.layers))
    assert errors == sorted(errors, reverse=True)
    model = detector()
    report = cluster_weights(model, KMeansConfig(bits=4, per_layer_bits={"backbone.stem.0.conv": 2},
                                                 init="density"))
    bits = {r.name: r.bits for r in report.layers}
    assert bits["backbone.stem.0.conv"] == 2 and set(bits.values()) == {2, 4}
    assert model.backbone.stem[0].conv.shared.centroids.numel() == 4


def test_export_keeps_shared_values_as_initializers_and_ort_equals_torch(tmp_path):
    model = detector()
    cluster_weights(model, KMeansConfig(bits=3))
    path = export_onnx(model, tmp_path / "k.onnx")
    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    convs = [n for n in g.node if n.op_type == "Conv"]
    assert all(n.input[1] in inits for n in convs)
    assert not any(n.op_type == "Gather" for n in g.node)
    x = np.random.default_rng(0).random((1, 3, 64, 64), dtype=np.float32)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))


def test_plan_round_trip_gives_the_identical_model():
    model = detector()
    plan = cluster_weights(model, KMeansConfig(bits=4, per_layer_bits={"neck.p4.conv": 6})).to_dict()["plan"]
    fresh = create_detector("yolo_tiny", num_classes=3, input_size=64, width_mult=0.25)
    restructure(fresh, plan)
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_size_accounting_is_bits_per_weight_plus_codebook():
    model = detector()
    fp32 = 4 * sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    report = cluster_weights(model, KMeansConfig(bits=4))
    n = sum(r.weights for r in report.layers)
    expected = fp32 - 4 * n + sum(-(-4 * r.weights // 8) + 4 * 16 for r in report.layers)
    assert report.bytes_fp32 == fp32 and report.bytes_compressed == expected
    assert report.to_dict()["size_ratio"] == pytest.approx(expected / fp32) and expected < 0.2 * fp32


def test_bad_input_is_a_clear_error():
    for bad in (0, 9, 2.5, True):
        with pytest.raises(ConfigError, match="must be an integer in 1..8"):
            KMeansConfig(bits=bad)
    with pytest.raises(ConfigError, match=r"per_layer_bits\['a'\]=12"):
        KMeansConfig(per_layer_bits={"a": 12})
    with pytest.raises(ConfigError, match="kmeans.init='kmeans\\+\\+' is unknown"):
        KMeansConfig(init="kmeans++")
    with pytest.raises(ConfigError, match="unknown kmeans setting"):
        KMeansConfig.from_dict({"bit": 4})
    model = detector()
    with pytest.raises(ConfigError, match=r"\['neck.p9.conv'\] match no"):
        cluster_weights(model, KMeansConfig(per_layer_bits={"neck.p9.conv": 4}))
    assert not any(isinstance(m, KMeansConv2d) for m in model.modules())
