"""The backend conformance suite: every zoo family x every CPU backend x {fp32, int8} exports, runs and
meets its tolerance, re-checked here independently of the export's own validation.

- fp32: raw head outputs within ``FP32_REL_TOL`` (1e-3) of torch, relative to max |torch|;
- int8: raw head outputs at >= 20 dB SQNR against torch fp32, and most convs really int8.

The models are the shipped trained conformance detectors (tests/assets/conformance, 128 px): int8 SQNR
says nothing on untrained weights (see tests/assets/make_conformance_models.py). A case that a runtime
truly cannot meet goes in ``XFAIL`` with its reason.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_compress.backends import get_backend, list_backends
from edge_compress.data.transforms import normalize
from edge_compress.export import FP32_REL_TOL, INT8_MIN_SQNR_DB, export_model, relative_error, sqnr_db
from edge_compress.quant import QuantConfig
from edge_compress.train import load_detector

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "conformance"
FAMILIES = ("yolo_tiny", "picodet_s", "ssdlite_mbv2", "ssdlite_mbv3")
CPU_BACKENDS = tuple(b for b in list_backends() if b != "tensorrt")   # TensorRT: tests/backends/test_tensorrt.py
XFAIL: dict[tuple[str, str, str], str] = {}   # (backend, family, precision) -> why the runtime cannot


@pytest.fixture(scope="module")
def data(synth128):
    return synth128


@pytest.fixture(scope="module")
def val_inputs(data):
    from edge_compress.pipeline import open_split

    ds = open_split(data, "val", (128, 128))
    model = load_detector(ASSETS / "yolo_tiny.pt")
    return np.concatenate([normalize(np.asarray(ds[i][0])[None], model.input_spec) for i in range(4)])


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_conformance(backend, family, precision, data, val_inputs, tmp_path):
    if (backend, family, precision) in XFAIL:
        pytest.xfail(XFAIL[backend, family, precision])
    ok, why = get_backend(backend, require_available=False).available()
    if not ok:
        pytest.skip(why)
    model = load_detector(ASSETS / f"{family}.pt")
    quant = QuantConfig(num_images=16) if precision == "int8" else None
    art = export_model(model, backend, tmp_path / "art", quant=quant, data=data if quant else None)

    out = get_backend(backend).load(art.path)(val_inputs)
    with torch.no_grad():
        ref = model(torch.from_numpy(val_inputs)).numpy()
    if precision == "fp32":
        assert art.manifest["validation"]["rel_error"] <= FP32_REL_TOL
        assert relative_error(ref, out) <= FP32_REL_TOL
        assert set(art.manifest["precision"].values()) == {"fp32"}
    else:
        assert art.manifest["validation"]["sqnr_db"] >= INT8_MIN_SQNR_DB
        assert sqnr_db(ref, out) >= INT8_MIN_SQNR_DB
        centred = sqnr_db(ref - ref.mean(0), out - out.mean(0))   # the part that depends on the image
        assert centred >= INT8_MIN_SQNR_DB - 6, centred
        precisions = list(art.manifest["precision"].values())
        assert precisions.count("int8") >= 0.8 * len(precisions), art.manifest["precision"]
