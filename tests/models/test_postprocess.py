"""The shared NumPy post-process: NMS against a brute-force reference, priors, decode."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_compress.errors import ConfigError
from edge_compress.models.postprocess import (Detections, PostProcessConfig, batched_nms, box_iou, decode,
                                               make_priors, nms, postprocess, unletterbox)


def _iou_scalar(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def brute_force_nms(boxes, scores, labels, thr):
    """Reference: visit boxes by descending score; keep one unless a kept box of the
    same label overlaps it by IoU > thr. Plain Python loops, no vectorisation."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if all(labels[j] != labels[i] or _iou_scalar(boxes[i], boxes[j]) <= thr for j in kept):
            kept.append(i)
    return kept


def _random_boxes(rng, n, span=100.0):
    xy = rng.uniform(0, span, (n, 2))
    wh = rng.uniform(1, span / 2, (n, 2))
    return np.concatenate([xy, xy + wh], 1)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 60), st.integers(1, 4), st.floats(0.1, 0.9))
def test_batched_nms_matches_brute_force(seed, n, n_cls, thr):
    rng = np.random.default_rng(seed)
    boxes = _random_boxes(rng, n)
    scores = rng.permutation(n).astype(np.float64) / n  # distinct scores
    labels = rng.integers(0, n_cls, n)
    got = batched_nms(boxes, scores, labels, thr).tolist()
    assert got == brute_force_nms(boxes, scores, labels, thr)


def test_nms_suppresses_overlap_and_keeps_disjoint():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], float)
    scores = np.array([0.9, 0.8, 0.7])
    assert nms(boxes, scores, 0.5).tolist() == [0, 2]
    # different classes never suppress each other
    assert sorted(batched_nms(boxes, scores, np.array([0, 1, 0]), 0.5).tolist()) == [0, 1, 2]


def test_box_iou_hand_values():
    a = np.array([[0, 0, 2, 2]], float)
    b = np.array([[1, 1, 3, 3], [0, 0, 2, 2], [5, 5, 6, 6]], float)
    np.testing.assert_allclose(box_iou(a, b), [[1 / 7, 1.0, 0.0]])


def test_priors_order_and_count():
    cfg = PostProcessConfig("yolo", 3, (16, 32), (((10, 14), (23, 27)), ((37, 58),)))
    p = make_priors(cfg, 64, 96)
    assert p.shape == (4 * 6 * 2 + 2 * 3 * 1, 5)
    np.testing.assert_array_equal(p[0], [8, 8, 10, 14, 16])
    np.testing.assert_array_equal(p[1], [8, 8, 23, 27, 16])  # anchor varies fastest
    np.testing.assert_array_equal(p[2], [24, 8, 10, 14, 16])  # then x
    np.testing.assert_array_equal(p[-1], [80, 48, 37, 58, 32])


def test_decode_gfl_hand_values():
    cfg = PostProcessConfig("gfl", 1, (8,), (((8, 8),),), reg_max=3)
    priors = make_priors(cfg, 32, 32)
    raw = np.full((1, len(priors), cfg.channels), -1e4, np.float32)
    # a one-hot distribution at bin 2 for every side: distances 2 strides = 16 px
    for side in range(4):
        raw[..., 1 + side * 4 + 2] = 1e4
    raw[..., 0] = 0.0  # sigmoid(0) = 0.5
    boxes, scores = decode(raw, cfg, priors)
    np.testing.assert_allclose(boxes[0, 0], [4 - 16, 4 - 16, 4 + 16, 4 + 16])
    np.testing.assert_allclose(scores[0, :, 0], 0.5)


def test_decode_ssd_zero_offsets_give_prior_box():
    cfg = PostProcessConfig("ssd", 2, (16,), (((20, 10),),))
    priors = make_priors(cfg, 32, 32)
    raw = np.zeros((1, len(priors), cfg.channels), np.float32)
    boxes, scores = decode(raw, cfg, priors)
    np.testing.assert_allclose(boxes[0, 0], [8 - 10, 8 - 5, 8 + 10, 8 + 5])
    np.testing.assert_allclose(scores[0, 0], [1 / 3, 1 / 3], rtol=1e-6)


def test_decode_rejects_wrong_shape():
    cfg = PostProcessConfig("yolo", 3, (16,), (((10, 14),),))
    priors = make_priors(cfg, 32, 32)
    with pytest.raises(ConfigError, match=r"expected \(N, 4, 8\)"):
        decode(np.zeros((1, 5, 8)), cfg, priors)


def test_postprocess_thresholds_topk_and_max_det():
    cfg = PostProcessConfig("ssd", 2, (8,), (((8, 8),),), score_thresh=0.5, max_det=3)
    priors = make_priors(cfg, 64, 64)  # 64 priors on an 8x8 grid, disjoint 8 px boxes
    raw = np.zeros((1, len(priors), cfg.channels), np.float32)
    raw[0, :10, 5] = 10.0  # ten confident class-0 priors
    det = postprocess(raw, cfg, priors)[0]
    assert len(det) == 3 and (det.labels == 0).all() and (det.scores > 0.99).all()


def test_unletterbox_inverts_letterbox():
    det = Detections(np.array([[10, 40, 110, 140]], np.float32), np.ones(1, np.float32), np.zeros(1, np.int64))
    out = unletterbox(det, scale=0.5, pad_x=0, pad_y=30, orig_w=640, orig_h=400)
    np.testing.assert_allclose(out.boxes, [[20, 20, 220, 220]])


def test_config_round_trip_and_validation():
    cfg = PostProcessConfig("gfl", 4, (8, 16), (((8, 8),), ((16, 16),)))
    assert PostProcessConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="head 'rcnn' is unknown"):
        PostProcessConfig("rcnn", 4, (8,), (((8, 8),),))
    with pytest.raises(ConfigError, match="anchor levels"):
        PostProcessConfig("gfl", 4, (8, 16), (((8, 8),),))
