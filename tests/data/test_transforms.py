"""Letterbox geometry and training augmentation (boxes follow the pixels)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_compress.data.transforms import (AugmentConfig, augment, hflip, letterbox, letterbox_boxes,
                                           scale_translate, unletterbox_boxes)
from edge_compress.errors import ConfigError, DataError

GREY = np.array([40, 40, 40], np.uint8)
WHITE = np.array([250, 250, 250], np.uint8)


def _image_with_box(h: int, w: int, box: tuple[int, int, int, int]) -> np.ndarray:
    img = np.empty((h, w, 3), np.uint8)
    img[:] = GREY
    x1, y1, x2, y2 = box
    img[y1:y2, x1:x2] = WHITE
    return img


def _bright_extent(img: np.ndarray) -> np.ndarray:
    """xyxy extent of the pixels that are mostly white (continuous pixel coordinates)."""
    ys, xs = np.nonzero(img.mean(2) > 145)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


# ----------------------------------------------------------------------------- letterbox
@pytest.mark.parametrize("h, w, box", [(100, 200, (20, 30, 90, 70)), (240, 120, (10, 100, 110, 230))])
def test_letterbox_non_square_maps_boxes_and_back(h: int, w: int, box: tuple) -> None:
    img = _image_with_box(h, w, box)
    out, scale, pad_x, pad_y = letterbox(img, 320, 320)
    assert out.shape == (320, 320, 3) and out.dtype == np.uint8
    assert scale == pytest.approx(min(320 / h, 320 / w))
    if w > h:  # padded top and bottom only
        assert pad_x == 0 and pad_y == (320 - round(h * scale)) // 2 > 0
        assert (out[:pad_y] == 114).all() and (out[pad_y + round(h * scale):] == 114).all()
    else:
        assert pad_y == 0 and pad_x == (320 - round(w * scale)) // 2 > 0
        assert (out[:, :pad_x] == 114).all() and (out[:, pad_x + round(w * scale):] == 114).all()
    mapped = letterbox_boxes(np.array([box], np.float32), scale, pad_x, pad_y)
    np.testing.assert_allclose(mapped[0], _bright_extent(out), atol=1.0)
    back = unletterbox_boxes(mapped, scale, pad_x, pad_y)
    np.testing.assert_allclose(back[0], box, atol=1e-4)


def test_letterbox_same_size_is_identity() -> None:
    img = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    out, scale, pad_x, pad_y = letterbox(img, 64, 96)
    assert (scale, pad_x, pad_y) == (1.0, 0, 0) and np.array_equal(out, img)


def test_unletterbox_clips_to_the_original_image() -> None:
    back = unletterbox_boxes(np.array([[-5, 70, 400, 90]]), 2.0, 0, 80, orig_w=160, orig_h=80)
    np.testing.assert_allclose(back, [[0, 0, 160, 5]])


def test_letterbox_rejects_non_rgb_arrays() -> None:
    with pytest.raises(DataError, match="HxWx3 uint8"):
        letterbox(np.zeros((10, 10), np.uint8), 32, 32)


# ----------------------------------------------------------------------------- augment
def test_hflip_maps_boxes_exactly() -> None:
    img = _image_with_box(48, 64, (5, 10, 25, 30))
    flipped, boxes = hflip(img, np.array([[5, 10, 25, 30], [0, 0, 64, 48]], np.float32))
    np.testing.assert_array_equal(boxes, [[39, 10, 59, 30], [0, 0, 64, 48]])
    np.testing.assert_array_equal(_bright_extent(flipped), boxes[0])
    np.testing.assert_array_equal(hflip(flipped, boxes)[0], img)


@pytest.mark.parametrize("s, ox, oy", [(0.6, 30.0, 12.5), (1.4, -40.0, -7.0), (1.0, 5.0, 0.0)])
def test_scale_translate_boxes_follow_the_content(s: float, ox: float, oy: float) -> None:
    img = _image_with_box(128, 128, (40, 50, 90, 80))
    out, boxes = scale_translate(img, np.array([[40, 50, 90, 80]], np.float32), s, ox, oy)
    np.testing.assert_allclose(boxes[0], [40 * s + ox, 50 * s + oy, 90 * s + ox, 80 * s + oy], rtol=1e-6)
    np.testing.assert_allclose(_bright_extent(out), boxes[0], atol=1.0)


def test_augment_with_forced_flip_and_scale_keeps_boxes_on_the_object() -> None:
    cfg = AugmentConfig(hflip=1.0, scale=(1.2, 1.2), hsv=(0.0, 0.0, 0.0), min_box_size=0.0)
    img = _image_with_box(96, 96, (30, 20, 60, 50))
    out, boxes, labels = augment(img, np.array([[30, 20, 60, 50]]), np.array([3]), cfg, np.random.default_rng(1))
    assert labels.tolist() == [3]
    np.testing.assert_allclose(_bright_extent(out), boxes[0], atol=1.0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1), n=st.integers(0, 8), data=st.data())
def test_augment_keeps_boxes_inside_the_canvas(seed: int, n: int, data: st.DataObject) -> None:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 60, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.5, 40, (n, 2))], 1).clip(0, 64).astype(np.float32)
    labels = np.arange(n)
    cfg = AugmentConfig(min_box_size=data.draw(st.sampled_from([0.0, 2.0, 5.0])))
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out, b, lab = augment(img, boxes, labels, cfg, np.random.default_rng(seed + 1))
    assert out.shape == img.shape and out.dtype == np.uint8
    assert b.shape == (len(lab), 4) and b.dtype == np.float32
    assert set(lab.tolist()) <= set(labels.tolist())
    assert (b >= 0).all() and (b[:, [0, 2]] <= 64).all() and (b[:, [1, 3]] <= 64).all()
    assert (b[:, 2] - b[:, 0] >= cfg.min_box_size).all() and (b[:, 2] > b[:, 0]).all()
    assert (b[:, 3] - b[:, 1] >= cfg.min_box_size).all() and (b[:, 3] > b[:, 1]).all()


def test_augment_is_a_function_of_the_generator_seed() -> None:
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    boxes, labels = np.array([[10, 10, 40, 50]], np.float32), np.array([1])
    a = augment(img, boxes, labels, AugmentConfig(), np.random.default_rng(42))
    b = augment(img, boxes, labels, AugmentConfig(), np.random.default_rng(42))
    c = augment(img, boxes, labels, AugmentConfig(), np.random.default_rng(43))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert img.flags.writeable and boxes.tolist() == [[10, 10, 40, 50]]  # inputs untouched


def test_colour_jitter_identity_and_effect() -> None:
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    none = AugmentConfig(hflip=0.0, scale=(1.0, 1.0), hsv=(0.0, 0.0, 0.0))
    assert np.array_equal(augment(img, np.zeros((0, 4)), np.zeros(0), none, np.random.default_rng(0))[0], img)
    dark = AugmentConfig(hflip=0.0, scale=(1.0, 1.0), hsv=(0.0, 0.0, 1.0))
    outs = [augment(img, np.zeros((0, 4)), np.zeros(0), dark, np.random.default_rng(s))[0] for s in range(4)]
    assert any(abs(o.astype(float).mean() - img.mean()) > 5 for o in outs)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, field", [
    ({"hflip": 1.5}, "hflip"), ({"scale": (1.4, 0.6)}, "scale"), ({"scale": (0.0, 1.0)}, "scale"),
    ({"hsv": (0.9, 0.5, 0.3)}, "hsv"), ({"hsv": (0.1, 0.2)}, "hsv"), ({"min_box_size": -1}, "min_box_size"),
    ({"pad_value": 300}, "pad_value"),
])
def test_augment_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"AugmentConfig.{field}"):
        AugmentConfig(**kwargs)


def test_augment_config_round_trip_and_unknown_keys() -> None:
    cfg = AugmentConfig.from_dict({"scale": [0.8, 1.2], "hsv": [0.01, 0.3, 0.2]})  # YAML lists
    assert cfg.scale == (0.8, 1.2) and hash(cfg) == hash(AugmentConfig.from_dict(cfg.to_dict()))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['flip'\]"):
        AugmentConfig.from_dict({"flip": 0.5})
