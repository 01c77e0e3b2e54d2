"""Per-layer sensitivity: per-channel weight quantization against a NumPy reference, one change per
copy (the model is untouched), drops against the baseline, unappliable settings recorded, JSON data."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from edge_compress.compress.sensitivity import (SensitivityConfig, fake_quant_per_channel, load_sensitivity,
                                                quantize_weight_, sensitivity)
from edge_compress.compress.sparsity import SparsityConfig, masks, prune_unstructured
from edge_compress.errors import ArtifactError, ConfigError
from edge_compress.models import create_detector


def numpy_fake_quant(w: np.ndarray, bits: int) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    out = np.empty_like(w)
    for c in range(w.shape[0]):
        s = np.abs(w[c]).max() / qmax
        out[c] = np.clip(np.round(w[c] / s), -qmax, qmax) * s
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_per_channel_quantization_matches_numpy(bits):
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(bits))
    q = fake_quant_per_channel(w, bits)
    assert np.allclose(q.numpy(), numpy_fake_quant(w.numpy(), bits), rtol=0, atol=1e-12)
    for c in range(6):   # at most 2^b - 1 distinct levels per channel, the extreme one kept exactly
        assert len(torch.unique(q[c])) <= 2 ** bits - 1
        assert q[c].abs().max() == pytest.approx(w[c].abs().max().item())


def test_quantizing_a_masked_layer_keeps_its_zeros():
    lin = nn.Sequential(nn.Linear(8, 4))
    prune_unstructured(lin, SparsityConfig("magnitude", 0.5, layers=("0",)))
    quantize_weight_(lin[0], 3)
    keep = masks(lin)["0"]
    assert (lin[0].weight[~keep] == 0).all() and len(torch.unique(lin[0].weight[0][keep[0]])) <= 7


def detector(data):
    from edge_compress.pipeline import open_split

    names = open_split(data, "val", (64, 64)).class_names
    torch.manual_seed(0)
    return create_detector("yolo_tiny", class_names=names, input_size=64, width_mult=0.25)


def test_sensitivity_per_layer_and_setting(tiny_synth, tmp_path):
    pytest.importorskip("edge_compress.compress.structured")
    model = detector(tiny_synth)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = ("backbone.stem.1.conv", "head.pred16")
    cfg = SensitivityConfig(prune_ratios=(0.5,), bits=(8, 2), layers=layers, max_images=4)
    result = sensitivity(model, tiny_synth, cfg)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())   # copies only
    d = result.to_dict()
    assert d["num_images"] == 4 and list(d["layers"]) == list(layers)
    stem = d["layers"]["backbone.stem.1.conv"]
    assert set(stem) == {"prune:0.5", "bits:8", "bits:2"}
    assert stem["prune:0.5"]["params"] < d["baseline"]["params"]
    assert stem["prune:0.5"]["macs"] < d["baseline"]["macs"]
    assert stem["bits:8"]["params"] == d["baseline"]["params"]
    for row in stem.values():
        assert row["ap_drop"] == pytest.approx(d["baseline"]["ap"] - row["ap"])
    assert "head output" in d["layers"]["head.pred16"]["prune:0.5"]["error"]   # recorded, not raised
    assert "ap" in d["layers"]["head.pred16"]["bits:8"]
    path = result.save(tmp_path / "sens.json")
    assert load_sensitivity(path) == json.loads(json.dumps(d))
    with pytest.raises(ArtifactError, match="already exists"):
        result.save(path)


def test_bad_settings_and_layer_names(tiny_synth):
    with pytest.raises(ConfigError, match="prune_ratios has 1.0"):
        SensitivityConfig(prune_ratios=(1.0,))
    with pytest.raises(ConfigError, match="bits has 1"):
        SensitivityConfig(bits=(1,))
    with pytest.raises(ConfigError, match="unknown sensitivity setting"):
        SensitivityConfig.from_dict({"ratios": [0.5]})
    with pytest.raises(ConfigError, match="no.such"):
        sensitivity(detector(tiny_synth), tiny_synth, SensitivityConfig(layers=("no.such",), max_images=2))
