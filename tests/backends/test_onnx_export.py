"""Every zoo family exports to ONNX, passes onnx's checker and matches torch through ONNX Runtime."""

import numpy as np
import onnx
import pytest
import torch

from edge_compress.backends import get_backend
from edge_compress.backends.onnx_export import check_onnx, conv_node_names, export_onnx
from edge_compress.export import FP32_REL_TOL, export_model, relative_error
from edge_compress.models import create_detector

FAMILIES = ["yolo_tiny", "picodet_s", "ssdlite_mbv2", "ssdlite_mbv3"]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_exports_and_matches_torch(name, tmp_path):
    torch.manual_seed(1)
    model = create_detector(name, num_classes=5, input_size=64).eval()
    art = export_model(model, "onnxruntime", tmp_path / "art")
    path = art.path / "model.onnx"

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["images"] and [o.name for o in proto.graph.output] == ["raw"]
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 64, 64]
    assert not list(path.parent.glob("*.data"))  # weights embedded in the one file

    # an input independent of the export's own validation input, batch of 2 (run image by image)
    x = np.random.default_rng(7).random((2, 3, 64, 64), dtype=np.float32) * 2 - 0.5
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = get_backend("onnxruntime").load(art.path)(x)
    assert out.shape == ref.shape == (2, len(model.priors()), model.post.channels)
    assert relative_error(ref, out) <= FP32_REL_TOL
    assert art.manifest["validation"]["rel_error"] <= FP32_REL_TOL

    convs = conv_node_names(path)
    n_torch_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert len(convs) == n_torch_convs and set(art.manifest["precision"]) == set(convs)
    assert set(art.manifest["precision"].values()) == {"fp32"}


def test_truncated_onnx_is_a_clear_error(tmp_path):
    from edge_compress.errors import ArtifactError

    model = create_detector("yolo_tiny", num_classes=3, input_size=64, width_mult=0.25)
    path = export_onnx(model, tmp_path / "model.onnx")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        check_onnx(path)
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        get_backend("onnxruntime").load(tmp_path)
