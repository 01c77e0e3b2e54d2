"""SSDLite family: shapes at several sizes, default boxes, decode parity, matching, loss, overfit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_compress.errors import ConfigError
from edge_compress.models import postprocess as pp
from edge_compress.models.boxes import box_iou
from edge_compress.models.ssdlite import (STRIDES, SSDLiteDetector, build_ssdlite, encode_ssd, decode_ssd,
                                          hard_negatives, match_ssd, ssd_default_boxes)


def _targets():
    return [torch.tensor([[1.0, 10, 12, 40, 50], [0.0, 60, 20, 90, 44]]),
            torch.tensor([[2.0, 30, 52, 70, 90]])]


def _feature_sizes(model, h, w):
    feats = list(model.backbone(torch.zeros(1, 3, h, w)))
    for extra in model.extras:
        feats.append(extra(feats[-1]))
    return [tuple(f.shape[-2:]) for f in feats]


@pytest.mark.parametrize("backbone,width", [("mobilenet_v2", 0.25), ("mobilenet_v3_small", 0.5)])
@pytest.mark.parametrize("size", [64, 96, 128, (64, 160)])
def test_forward_shape_and_feature_sizes(backbone, width, size):
    torch.manual_seed(0)
    m = build_ssdlite(num_classes=3, input_size=size, backbone=backbone, width_mult=width).eval()
    h, w = (size, size) if isinstance(size, int) else size
    raw = m(torch.rand(2, 3, h, w))
    assert raw.shape == (2, len(m.priors()), m.post.channels) == (2, len(m.priors()), 4 + 1 + 3)
    assert _feature_sizes(m, h, w) == [(pp.feature_size(h, s), pp.feature_size(w, s)) for s in STRIDES]


@pytest.mark.parametrize("size", [256, 320, 384])
def test_default_models_at_deployment_sizes(size):
    for backbone, width in (("mobilenet_v2", 0.5), ("mobilenet_v3_small", 1.0)):
        m = build_ssdlite(num_classes=8, input_size=size, backbone=backbone, width_mult=width).eval()
        assert _feature_sizes(m, size, size) == [(pp.feature_size(size, s),) * 2 for s in STRIDES]
    with torch.no_grad():
        assert m(torch.rand(1, 3, size, size)).shape == (1, len(m.priors()), 13)


def test_module_names_and_family():
    m = build_ssdlite(num_classes=2, input_size=64, width_mult=0.25)
    assert isinstance(m, SSDLiteDetector) and m.family == "ssdlite"
    names = dict(m.named_modules())
    for n in ("backbone.stem.conv", "backbone.stage2.0.expand.conv", "backbone.stage5.0.dw.conv",
              "backbone.last_conv.conv", "extras.0.dw.conv", "head.0.dw.conv", "head.3.pred"):
        assert n in names
    m3 = build_ssdlite(num_classes=2, input_size=64, backbone="mobilenet_v3_small")
    assert "backbone.stage4.0.se.fc1" in dict(m3.named_modules())


def test_registered_zoo_entries():
    from edge_compress.models import create_detector, list_detectors

    assert {"ssdlite_mbv2", "ssdlite_mbv3"} <= set(list_detectors("ssdlite*"))
    m = create_detector("ssdlite_mbv3", num_classes=2, input_size=64)
    assert m.family == "ssdlite" and m.build_kwargs["backbone"] == "mobilenet_v3_small"
    assert create_detector("ssdlite_mbv2", num_classes=2, input_size=64).build_kwargs["width_mult"] == 0.5


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="backbone"):
        build_ssdlite(num_classes=2, input_size=64, backbone="resnet50")
    with pytest.raises(ConfigError, match="unknown option"):
        build_ssdlite(num_classes=2, input_size=64, depth=2)


def test_default_boxes_follow_the_scale_rule_and_cover_small_objects():
    anchors = ssd_default_boxes(320, 320)
    assert [len(a) for a in anchors] == [4] * len(STRIDES)
    smallest = min(min(w, h) for w, h in anchors[0])
    assert 12 <= smallest and 16 <= anchors[0][0][0] <= 24  # level 0, aspect 1 box ~19 px
    sides = [a[0][0] for a in anchors]
    assert np.allclose(np.diff(sides), np.diff(sides)[0])  # linear scales
    for w, h in anchors[1][2:]:
        assert np.isclose(w / h, 2.0) or np.isclose(h / w, 2.0)
    # non-square input: scales follow each side
    assert ssd_default_boxes(320, 640)[0][0] == (anchors[0][0][0] * 2, anchors[0][0][1])


def test_torch_decode_equals_numpy_postprocess_and_encode_inverts_it():
    m = build_ssdlite(num_classes=4, input_size=96, width_mult=0.25)
    raw = torch.randn(2, len(m.priors()), m.post.channels, generator=torch.Generator().manual_seed(1)) * 3
    boxes, scores = m.decode(raw)
    ref_boxes, ref_scores = pp.decode(raw.numpy(), m.post, m.priors())
    np.testing.assert_allclose(boxes.numpy(), ref_boxes, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-5, atol=1e-6)
    enc = encode_ssd(boxes[0], m.priors_t)
    np.testing.assert_allclose(decode_ssd(torch.cat([enc, raw[0, :, 4:]], 1), m.priors_t)[0].numpy(),
                               boxes[0].numpy(), rtol=1e-4, atol=1e-3)


def test_matching_thresholds_forced_best_prior_and_padding():
    priors = torch.tensor([[10.0, 10, 20, 20, 16], [30, 10, 20, 20, 16], [50, 50, 40, 40, 16]])
    targets = [torch.tensor([[2.0, 0, 0, 20, 20],     # = prior 0
                             [1.0, 44, 44, 52, 52]]),  # tiny: IoU 0.04 with prior 2, forced onto it
               torch.zeros(0, 5)]
    labels, boxes = match_ssd(targets, priors)
    assert labels.tolist() == [[3, 0, 2], [0, 0, 0]]
    assert torch.equal(boxes[0, 2], targets[0][1, 1:])
    ce = torch.tensor([[5.0, 1.0, 3.0, 4.0, 2.0]])
    pos = torch.tensor([[True, False, False, False, False]])
    assert hard_negatives(ce, pos, ratio=2, min_neg=0).tolist() == [[False, False, True, True, False]]


def test_loss_finite_with_grads_and_empty_images():
    torch.manual_seed(0)
    m = build_ssdlite(num_classes=3, input_size=96, width_mult=0.25)
    raw = m(torch.rand(3, 3, 96, 96))
    loss, parts = m.loss(raw, _targets() + [torch.zeros(0, 5)])
    assert torch.isfinite(loss) and parts["num_pos"] >= 3 and set(parts) >= {"box", "cls"}
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    loss0, parts0 = m.loss(m(torch.rand(2, 3, 96, 96)), [torch.zeros(0, 5), torch.zeros(0, 5)])
    assert torch.isfinite(loss0) and loss0 > 0 and parts0["num_pos"] == 0.0  # negatives still train
    loss0.backward()


def test_overfit_two_images_and_recover_boxes():
    torch.manual_seed(0)
    m = build_ssdlite(num_classes=3, input_size=128, width_mult=0.25)
    images = torch.rand(2, 3, 128, 128) * 0.2
    targets = _targets()
    for img, t in zip(images, targets):
        for c, x1, y1, x2, y2 in t.tolist():
            img[int(c), int(y1):int(y2), int(x1):int(x2)] = 1.0
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    history = []
    for _ in range(60):
        loss, _ = m.loss(m(images), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert history[-1] < 0.05 * history[0]
    # BN running statistics of a 2-image batch (1x1 maps at stride 128) lag far behind
    # 60 large Adam steps: re-estimate them on the batch (BN recalibration) before eval.
    for bn in m.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.reset_running_stats()
            bn.momentum = None
    with torch.no_grad():
        m(images)
    for det, tgt in zip(m.predict(images), targets):
        keep = det.scores >= 0.3
        iou = box_iou(torch.from_numpy(det.boxes[keep]), tgt[:, 1:])
        for j in range(len(tgt)):
            hit = (iou[:, j] > 0.5) & (torch.from_numpy(det.labels[keep]) == int(tgt[j, 0]))
            assert hit.any(), f"object {tgt[j].tolist()} not recovered: {det}"
        assert iou[int(np.argmax(det.scores[keep]))].max() > 0.5
