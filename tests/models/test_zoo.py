"""Every registered zoo detector builds, runs and summarises; the registry explains misses."""

import pytest
import torch

from edge_compress.errors import UnknownNameError
from edge_compress.models import create_detector, list_detectors, summarize

NAMES = list_detectors()


def test_every_family_is_in_the_zoo():
    families = {create_detector(n, num_classes=3, input_size=64).family for n in NAMES}
    assert families == {"yolo_tiny", "picodet", "ssdlite"}
    assert {"picodet_s", "yolo_tiny", "ssdlite_mbv2", "ssdlite_mbv3"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [64, (96, 128)])
def test_forward_shape_matches_priors(name, size):
    m = create_detector(name, num_classes=5, input_size=size).eval()
    h, w = (size, size) if isinstance(size, int) else size
    with torch.no_grad():
        out = m(torch.rand(2, 3, h, w))
    assert out.shape == (2, len(m.priors()), m.post.channels)
    dets = m.predict(torch.rand(1, 3, h, w))
    assert len(dets) == 1


@pytest.mark.parametrize("name", NAMES)
def test_summary_and_config(name):
    m = create_detector(name, num_classes=8, input_size=320)
    s = summarize(m)
    assert s.params == sum(p.numel() for p in m.parameters()) and s.flops == 2 * s.macs > 0
    assert 0.05 < s.gflops < 10
    cfg = m.config()
    assert cfg["name"] == name and cfg["input_spec"]["height"] == 320 and len(cfg["class_names"]) == 8


def test_width_multiplier_shrinks_the_model():
    small = summarize(create_detector("picodet_s", num_classes=8, width_mult=0.5, input_size=128))
    big = summarize(create_detector("picodet_s", num_classes=8, width_mult=1.0, input_size=128))
    assert small.params < big.params and small.macs < big.macs


def test_unknown_name_lists_the_choices():
    with pytest.raises(UnknownNameError, match="unknown model 'picodet_q'.*choose one of: .*picodet_s"):
        create_detector("picodet_q")
