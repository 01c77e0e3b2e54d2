"""YOLOv4-tiny family: shapes, decode parity with the NumPy post-process, loss, overfit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_compress.errors import ConfigError
from edge_compress.models import postprocess as pp
from edge_compress.models.boxes import box_iou
from edge_compress.models.yolo_tiny import (STRIDES, YoloTinyDetector, assign_yolo, build_yolo_tiny,
                                            scaled_anchors)


def _targets():
    return [torch.tensor([[1.0, 10, 12, 40, 50], [0.0, 60, 20, 90, 44]]),
            torch.tensor([[2.0, 30, 52, 70, 90]])]


@pytest.mark.parametrize("size,width", [(64, 0.25), (96, 0.25), (128, 0.5), ((64, 128), 0.25)])
def test_forward_shape_matches_priors(size, width):
    torch.manual_seed(0)
    m = build_yolo_tiny(num_classes=3, input_size=size, width_mult=width)
    h, w = (size, size) if isinstance(size, int) else size
    raw = m(torch.rand(2, 3, h, w))
    assert raw.shape == (2, len(m.priors()), m.post.channels) == (2, len(m.priors()), 8)
    sizes = [pp.feature_size(h, s) * pp.feature_size(w, s) * 3 for s in STRIDES]
    assert len(m.priors()) == sum(sizes)


def test_default_build_at_320_and_module_names():
    m = build_yolo_tiny(num_classes=8, width_mult=0.5)
    assert isinstance(m, YoloTinyDetector) and m.family == "yolo_tiny"
    assert m(torch.rand(1, 3, 320, 320)).shape == (1, 20 * 20 * 3 + 10 * 10 * 3, 13)
    names = dict(m.named_modules())
    for n in ("backbone.stem.0.conv", "backbone.stage3.conv1.conv", "backbone.stage5.conv4.bn",
              "neck.p4.conv", "head.pred16", "head.pred32"):
        assert n in names
    # anchors are the YOLOv4-tiny 416-px anchors scaled to the input
    np.testing.assert_allclose(m.post.anchors[0][0], (10 * 320 / 416, 14 * 320 / 416))
    assert scaled_anchors(416, 416)[1][2] == (344.0, 319.0)


def test_registered_zoo_entries():
    from edge_compress.models import create_detector, list_detectors

    assert {"yolo_tiny", "yolo_tiny_l"} <= set(list_detectors("yolo*"))
    small = create_detector("yolo_tiny", num_classes=2, input_size=64)
    large = create_detector("yolo_tiny_l", num_classes=2, input_size=64)
    assert small.family == large.family == "yolo_tiny"
    assert small.backbone.conv5.conv.out_channels == 256 and large.backbone.conv5.conv.out_channels == 512


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown option"):
        build_yolo_tiny(num_classes=2, input_size=64, depth=3)
    with pytest.raises(ConfigError, match="width_mult"):
        build_yolo_tiny(num_classes=2, input_size=64, width_mult=0)


def test_torch_decode_equals_numpy_postprocess():
    m = build_yolo_tiny(num_classes=4, input_size=96, width_mult=0.25)
    raw = torch.randn(2, len(m.priors()), m.post.channels, generator=torch.Generator().manual_seed(1)) * 3
    boxes, scores = m.decode(raw)
    ref_boxes, ref_scores = pp.decode(raw.numpy(), m.post, m.priors())
    np.testing.assert_allclose(boxes.numpy(), ref_boxes, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(scores.numpy(), ref_scores, rtol=1e-5, atol=1e-6)


def test_assignment_cells_neighbours_and_shape_ratio():
    anchors = torch.tensor([[16.0, 16.0], [64.0, 64.0], [200.0, 40.0]])
    # one 20x20 GT centred at (36, 20) -> grid (2.25, 1.25) at stride 16 on a 6x6 grid
    gt = torch.tensor([[1.0, 3.0, 26.0, 10.0, 46.0, 30.0]])
    b, cls, idx, tbox = assign_yolo(gt, anchors, 16, 6, 6)
    # anchors 0 (ratio 1.25) and 1 (ratio 3.2) match, anchor 2 (ratio 10) does not
    cells = sorted((int(i) // 3 % 6, int(i) // 18, int(i) % 3) for i in idx)  # (x, y, anchor)
    # own cell (2,1), left neighbour (1,1) and upper neighbour (2,0), for both anchors
    assert cells == sorted((x, y, a) for a in (0, 1) for x, y in ((2, 1), (1, 1), (2, 0)))
    assert (b == 1).all() and (cls == 3).all() and torch.equal(tbox, gt[:, 2:].expand(6, 4))


def test_loss_finite_with_grads_and_empty_images():
    torch.manual_seed(0)
    m = build_yolo_tiny(num_classes=3, input_size=96, width_mult=0.25)
    raw = m(torch.rand(3, 3, 96, 96))
    targets = _targets() + [torch.zeros(0, 5)]
    loss, parts = m.loss(raw, targets)
    assert torch.isfinite(loss) and set(parts) >= {"box", "obj", "cls"} and parts["num_pos"] > 0
    loss.backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    # a batch with no objects at all
    loss0, parts0 = m.loss(m(torch.rand(2, 3, 96, 96)), [torch.zeros(0, 5), torch.zeros((0, 5))])
    assert torch.isfinite(loss0) and parts0["box"] == 0.0 and parts0["num_pos"] == 0.0
    loss0.backward()


def _overfit(model, images, targets, steps, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    history = []
    for _ in range(steps):
        loss, _ = model.loss(model(images), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    return history


def assert_recovers(dets, targets, min_score=0.3):
    for det, tgt in zip(dets, targets):
        keep = det.scores >= min_score
        assert keep.sum() >= len(tgt), f"only {keep.sum()} confident detections for {len(tgt)} objects"
        iou = box_iou(torch.from_numpy(det.boxes[keep]), tgt[:, 1:])
        for j in range(len(tgt)):
            hit = (iou[:, j] > 0.5) & (torch.from_numpy(det.labels[keep]) == int(tgt[j, 0]))
            assert hit.any(), f"object {tgt[j].tolist()} not recovered: {det}"
        # the most confident detection is one of the objects
        assert iou[int(np.argmax(det.scores[keep]))].max() > 0.5


def test_overfit_two_images_and_recover_boxes():
    torch.manual_seed(0)
    m = build_yolo_tiny(num_classes=3, input_size=96, width_mult=0.25)
    images = torch.rand(2, 3, 96, 96) * 0.2
    targets = _targets()
    for img, t in zip(images, targets):  # paint the objects so they are visible
        for c, x1, y1, x2, y2 in t.tolist():
            img[int(c), int(y1):int(y2), int(x1):int(x2)] = 1.0
    history = _overfit(m, images, targets, steps=60, lr=1e-2)
    assert history[-1] < 0.25 * history[0]
    assert_recovers(m.predict(images), targets)
