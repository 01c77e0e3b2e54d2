"""A synthetic COCO-format detection dataset: coloured shapes on cluttered backgrounds.

``generate_synthetic(out_dir)`` writes ``images/{train,val}/NNNNNN.jpg`` and
``annotations/instances_{train,val}.json`` (standard COCO, category ids from 1).

It is built to be a real, if small, detection task rather than a toy:

* ten classes, five colours x two shapes each (``CLASS_NAMES``), so neither colour
  nor shape alone identifies a class; colour, saturation, brightness and shading
  are jittered per instance;
* 1-12 objects per image whose sizes are (tilted) log-uniform from 8 px to about
  half the image, so COCO small (< 32^2), medium and large boxes all occur;
* partial occlusion and truncation at the border; every drawn object keeps at
  least ``MIN_VISIBLE`` of its pixels visible (a placement that would hide more of
  itself or of an earlier object is rejected), so no drawn object goes unlabelled;
* textured backgrounds (gradients, low-frequency colour noise, blobs, stripes,
  noise patches), neutral-coloured clutter shapes that are not a class, and
  Gaussian noise with occasional blur.

Every image is a pure function of ``(seed, split, index)`` (its own
``np.random.default_rng``), so the output is byte-identical for a seed whatever
the worker count or generation order.
"""

from __future__ import annotations

import colorsys
import json
import math
import multiprocessing as mp
import os
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from edge_compress.errors import ConfigError, DataError

CLASS_NAMES: tuple[str, ...] = (
    "red_circle", "red_square",
    "blue_triangle", "blue_star",
    "green_ring", "green_cross",
    "yellow_hexagon", "yellow_diamond",
    "purple_ellipse", "purple_crescent",
)
SPLITS: tuple[str, ...] = ("train", "val")
MIN_VISIBLE = 0.4        # fraction of an object's pixels that must stay visible
MIN_OBJECT_PX = 8.0      # smallest object extent, in pixels
MAX_EXTENT = 0.55        # largest object extent, as a fraction of the image size
MAX_OBJECTS = 12
JPEG_QUALITY = 92

_HUE = {"red": 0.0, "blue": 0.62, "green": 0.34, "yellow": 0.14, "purple": 0.80}
_MIN_VALUE = {"yellow": 0.78}                     # dark yellow reads as olive/brown
_MAX_TILT = {"square": math.radians(20), "diamond": math.radians(20)}  # else any angle
_SPLIT_CODE = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SynthPaths:
    """Where ``generate_synthetic`` put the two splits."""

    root: Path
    train_images: Path
    train_ann: Path
    val_images: Path
    val_ann: Path

    @classmethod
    def under(cls, root: Path) -> "SynthPaths":
        ann = root / "annotations"
        return cls(root, root / "images" / "train", ann / "instances_train.json",
                   root / "images" / "val", ann / "instances_val.json")


@dataclass
class _Object:
    label: int
    alpha: np.ndarray            # soft coverage in [0, 1], cropped to the image
    region: tuple[slice, slice]  # (rows, cols) of the crop in the image
    mask: np.ndarray             # alpha >= 0.5: the pixels the object owns
    total: int                   # mask pixels of the uncropped object
    visible: int = 0


# ----------------------------------------------------------------------------- shapes
def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    a = phase + 2.0 * np.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], 1) * radius


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    k = np.arange(2 * points)
    r = np.where(k % 2 == 0, 1.0, inner)
    a = -np.pi / 2 + np.pi * k / points
    return np.stack([r * np.cos(a), r * np.sin(a)], 1)


def _plus(arm: float) -> np.ndarray:
    t = arm
    return np.array([(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t),
                     (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)], float)


def _shape_parts(shape: str, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Polygons in unit coordinates (radius 1) with their fill (255 draws, 0 cuts)."""
    disc = _regular(64)
    if shape == "circle":
        return [(disc, 255)]
    if shape == "ring":
        return [(disc, 255), (_regular(64, rng.uniform(0.5, 0.65)), 0)]
    if shape == "crescent":
        return [(disc, 255), (_regular(64, 0.85) + [rng.uniform(0.35, 0.55), 0.0], 0)]
    if shape == "ellipse":
        return [(disc * [1.0, rng.uniform(0.4, 0.6)], 255)]
    polys = {"square": lambda: _regular(4, phase=np.pi / 4),
             "triangle": lambda: _regular(3, phase=-np.pi / 2),
             "star": lambda: _star(5, rng.uniform(0.4, 0.5)),
             "cross": lambda: _plus(rng.uniform(0.25, 0.35)),
             "hexagon": lambda: _regular(6),
             "diamond": lambda: np.array([(0, -1), (0.6, 0), (0, 1), (-0.6, 0)], float)}
    return [(polys[shape](), 255)]


def _place_parts(parts: list[tuple[np.ndarray, int]], shape: str, radius: float,
                 centre: np.ndarray, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    """Unit polygons -> image coordinates: aspect jitter, rotation, scale, shift."""
    tilt = _MAX_TILT.get(shape, math.pi)
    theta = rng.uniform(-tilt, tilt)
    aspect = rng.uniform(0.9, 1.1)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    stretch = np.array([radius * aspect, radius / aspect])
    return [((poly * stretch) @ rot.T + centre, fill) for poly, fill in parts]


def _rasterise(parts: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage of the polygons (supersampled), and its top-left pixel."""
    pts = np.concatenate([p for p, _ in parts])
    x0, y0 = np.floor(pts.min(0)).astype(int) - 1
    x1, y1 = np.ceil(pts.max(0)).astype(int) + 1
    ss = 4 if max(x1 - x0, y1 - y0) < 64 else 2
    canvas = Image.new("L", (int(x1 - x0) * ss, int(y1 - y0) * ss), 0)
    draw = ImageDraw.Draw(canvas)
    for poly, fill in parts:
        draw.polygon(((poly - [x0, y0]) * ss).ravel().tolist(), fill=fill)
    alpha = np.asarray(canvas.reduce(ss), dtype=np.float32) / 255.0
    return alpha, int(x0), int(y0)


def _crop(alpha: np.ndarray, x0: int, y0: int, size: int) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    h, w = alpha.shape
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, size), min(y0 + h, size)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    return alpha[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0], (slice(cy0, cy1), slice(cx0, cx1))


def _sample_object(rng: np.random.Generator, size: int,
                   centre: np.ndarray | None = None) -> _Object | None:
    label = int(rng.integers(len(CLASS_NAMES)))
    shape = CLASS_NAMES[label].split("_")[1]
    # Log-uniform from 8 px to ~half the image, tilted towards larger sizes (u**0.6):
    # a box is smaller than the shape's extent, so plain log-uniform gave only ~8%
    # COCO-large boxes; this gives about 35% small, 50% medium, 15% large.
    u = rng.random() ** 0.6
    extent = math.exp(math.log(MIN_OBJECT_PX) + u * math.log(MAX_EXTENT * size / MIN_OBJECT_PX))
    centre = rng.uniform(0, size, 2) if centre is None else centre
    parts = _place_parts(_shape_parts(shape, rng), shape, extent / 2, centre, rng)
    alpha, x0, y0 = _rasterise(parts)
    full_mask = alpha >= 0.5
    cropped = _crop(alpha, x0, y0, size)
    if cropped is None or not full_mask.any():
        return None
    a, region = cropped
    return _Object(label, a, region, a >= 0.5, int(full_mask.sum()))


# ----------------------------------------------------------------------------- occlusion
def _try_place(obj: _Object, placed: list[_Object], owner: np.ndarray) -> bool:
    """Claim ``obj``'s pixels in ``owner`` unless that leaves any object (``obj``
    itself, truncated by the border, or an earlier one it covers) less than
    ``MIN_VISIBLE`` visible."""
    inside = int(obj.mask.sum())
    if inside < MIN_VISIBLE * obj.total:
        return False
    under = owner[obj.region][obj.mask]
    lost = np.bincount(under[under >= 0], minlength=len(placed))
    for j in np.flatnonzero(lost):
        if placed[j].visible - lost[j] < MIN_VISIBLE * placed[j].total:
            return False
    for j in np.flatnonzero(lost):
        placed[j].visible -= int(lost[j])
    owner[obj.region][obj.mask] = len(placed)
    obj.visible = inside
    placed.append(obj)
    return True


def _place_objects(rng: np.random.Generator, size: int) -> list[_Object]:
    target = int(rng.integers(1, MAX_OBJECTS + 1))
    owner = np.full((size, size), -1, np.int16)
    placed: list[_Object] = []
    for _ in range(4 * target):
        if len(placed) == target:
            break
        obj = _sample_object(rng, size)
        if obj is not None:
            _try_place(obj, placed, owner)
    while not placed:  # an object at the centre fits: it is at most ~0.6 of the image
        obj = _sample_object(rng, size, centre=np.array([size / 2, size / 2]))
        if obj is not None:
            _try_place(obj, placed, owner)
    return placed


def _object_colour(label: int, rng: np.random.Generator) -> np.ndarray:
    colour = CLASS_NAMES[label].split("_")[0]
    hue = (_HUE[colour] + rng.uniform(-0.025, 0.025)) % 1.0
    value = rng.uniform(_MIN_VALUE.get(colour, 0.55), 1.0)
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 0.95), value)
    return np.array(rgb, np.float32) * 255.0


def _paint(canvas: np.ndarray, obj: _Object, rng: np.random.Generator) -> None:
    """Alpha-composite the object with a linear shading ramp (a light direction)."""
    h, w = obj.alpha.shape
    gx, gy = (rng.uniform(-0.3, 0.3, 2) / max(h, w)).astype(np.float32)
    shade = 1.0 + gy * (np.arange(h, dtype=np.float32) - h / 2)[:, None] \
        + gx * (np.arange(w, dtype=np.float32) - w / 2)[None, :]
    colour = _object_colour(obj.label, rng) * shade[..., None]
    a = obj.alpha[..., None]
    canvas[obj.region] = canvas[obj.region] * (1.0 - a) + colour * a


def _box(obj: _Object) -> tuple[float, float, float, float]:
    """Tight xyxy box of the object's full (not just visible) in-image extent."""
    rows, cols = np.flatnonzero(obj.mask.any(1)), np.flatnonzero(obj.mask.any(0))
    y0, x0 = obj.region[0].start, obj.region[1].start
    return (float(x0 + cols[0]), float(y0 + rows[0]), float(x0 + cols[-1] + 1), float(y0 + rows[-1] + 1))


# ----------------------------------------------------------------------------- background
@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _muted(rng: np.random.Generator, n: int) -> np.ndarray:
    c = rng.uniform(20, 235, (n, 3))
    grey = c.mean(1, keepdims=True)
    return grey + (c - grey) * rng.uniform(0.2, 0.8, (n, 1))


def _gradient(rng: np.random.Generator, res: int) -> np.ndarray:
    yy, xx = _grid(res)
    c0, c1 = _muted(rng, 2).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    t = xx * math.cos(theta) + yy * math.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return c0 + (c1 - c0) * t[..., None]


def _value_noise(rng: np.random.Generator, res: int) -> np.ndarray:
    """Low-frequency colour clouds: a tiny random image upsampled bicubically."""
    k = int(rng.integers(3, 9))
    low = Image.fromarray(rng.integers(0, 256, (k, k, 3), dtype=np.uint8))
    up = np.asarray(low.resize((res, res), Image.Resampling.BICUBIC), dtype=np.float32)
    return (up - 127.5) * (rng.uniform(8, 35) / 127.5)


def _add_blobs(img: np.ndarray, rng: np.random.Generator, res: int) -> None:
    axis = np.arange(res, dtype=np.float32)
    for _ in range(int(rng.integers(0, 5))):
        cx, cy = rng.uniform(0, res, 2)
        sigma = rng.uniform(0.05, 0.25) * res
        g = np.exp(-((axis - cy) ** 2) / (2 * sigma ** 2))[:, None] \
            * np.exp(-((axis - cx) ** 2) / (2 * sigma ** 2))[None, :]
        img += g[..., None] * rng.uniform(-60, 60, 3).astype(np.float32)


def _smooth_layer(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient + colour clouds + blobs: all low-frequency, so they are drawn at a
    quarter of the resolution and upsampled once (a few times cheaper)."""
    res = max(size // 4, 16)
    low = _gradient(rng, res) + _value_noise(rng, res)
    _add_blobs(low, rng, res)
    img = Image.fromarray(np.clip(low, 0, 255).astype(np.uint8))
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32).copy()


def _random_rect(rng: np.random.Generator, size: int) -> tuple[slice, slice]:
    x0, y0 = rng.integers(0, size - 8, 2)
    w, h = rng.integers(8, size // 2 + 1, 2)
    return slice(int(y0), int(min(y0 + h, size))), slice(int(x0), int(min(x0 + w, size)))


def _add_stripes(img: np.ndarray, rng: np.random.Generator, size: int) -> None:
    if rng.random() > 0.5:
        return
    rows, cols = _random_rect(rng, size) if rng.random() < 0.7 else (slice(0, size), slice(0, size))
    yy, xx = _grid(size)
    theta, period = rng.uniform(0, np.pi), rng.uniform(5, 40)
    phase = (xx[rows, cols] * math.cos(theta) + yy[rows, cols] * math.sin(theta)) * (2 * np.pi / period)
    wave = np.sin(phase + rng.uniform(0, 2 * np.pi)) * rng.uniform(8, 35)
    img[rows, cols] += wave[..., None] * rng.uniform(0.3, 1.0, 3).astype(np.float32)


def _add_noise_patches(img: np.ndarray, rng: np.random.Generator, size: int) -> None:
    for _ in range(int(rng.integers(0, 4))):
        rows, cols = _random_rect(rng, size)
        shape = (rows.stop - rows.start, cols.stop - cols.start, 1)
        img[rows, cols] += rng.standard_normal(shape, dtype=np.float32) * rng.uniform(6, 25)


def _neutral(rng: np.random.Generator) -> tuple[int, int, int]:
    grey = rng.uniform(25, 230)
    return tuple(int(v) for v in np.clip(grey + rng.uniform(-12, 12, 3), 0, 255))


def _draw_clutter(img: Image.Image, rng: np.random.Generator, size: int) -> None:
    """Neutral-coloured distractors (no class is grey): blobs, sticks, boxes, rings."""
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 11))):
        kind, colour = int(rng.integers(4)), _neutral(rng)
        cx, cy = rng.uniform(0, size, 2)
        r = math.exp(rng.uniform(math.log(4), math.log(size / 4)))
        if kind == 0:
            n = int(rng.integers(3, 8))
            ang = np.sort(rng.uniform(0, 2 * np.pi, n))
            rad = r * rng.uniform(0.4, 1.0, n)
            draw.polygon(np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).ravel().tolist(), fill=colour)
        elif kind == 1:
            ex, ey = rng.uniform(-2 * r, 2 * r, 2)
            draw.line([cx, cy, cx + ex, cy + ey], fill=colour, width=int(rng.integers(1, 5)))
        else:
            box = [cx - r, cy - r * rng.uniform(0.3, 1), cx + r, cy + r * rng.uniform(0.3, 1)]
            fill = colour if rng.random() < 0.5 else None
            width = int(rng.integers(1, 4))
            (draw.rectangle if kind == 2 else draw.ellipse)(box, fill=fill, outline=colour, width=width)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    img = _smooth_layer(rng, size)
    _add_stripes(img, rng, size)
    _add_noise_patches(img, rng, size)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    _draw_clutter(pil, rng, size)
    return np.asarray(pil, dtype=np.float32).copy()


@lru_cache(maxsize=2)
def _noise_field(side: int) -> np.ndarray:
    """A fixed Gaussian noise field, the same in every process (constant seed)."""
    return np.random.default_rng(0x5EED).standard_normal((side, side, 3), dtype=np.float32)


def _gaussian_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """i.i.d. N(0, 1) per pixel and channel: a random window of a field twice the
    image size, randomly flipped/transposed (a view, ~0.1 ms), because drawing
    fresh normals cost ~5 ms, a third of an image's rendering time."""
    field = _noise_field(2 * size)
    x0, y0 = rng.integers(0, size + 1, 2)
    window = field[y0:y0 + size, x0:x0 + size]
    flip_y, flip_x, transpose = rng.random(3) < 0.5
    window = window[::-1] if flip_y else window
    window = window[:, ::-1] if flip_x else window
    return window.transpose(1, 0, 2) if transpose else window


def _finish(canvas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera-ish degradations: occasional mild blur, then Gaussian sensor noise."""
    if rng.random() < 0.3:
        pil = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
        canvas = np.asarray(pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.2))), dtype=np.float32)
    noisy = _gaussian_noise(rng, canvas.shape[0]) * np.float32(rng.uniform(2, 10))
    noisy += canvas + np.float32(0.5)
    return np.clip(noisy, 0, 255, out=noisy).astype(np.uint8)


# ----------------------------------------------------------------------------- one image
def render_image(seed: int, split: str, index: int, image_size: int = 320
                 ) -> tuple[np.ndarray, list[tuple[int, tuple[float, float, float, float]]]]:
    """One image (HxWx3 uint8) and its objects as ``(label, (x1, y1, x2, y2))``.

    A pure function of its arguments: it draws from its own generator seeded
    with ``(seed, split, index)``.
    """
    if split not in _SPLIT_CODE:
        raise ConfigError(f"render_image: split={split!r}; expected one of {SPLITS}")
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    canvas = _background(rng, image_size)
    objects = _place_objects(rng, image_size)
    for obj in objects:
        _paint(canvas, obj, rng)
    return _finish(canvas, rng), [(obj.label, _box(obj)) for obj in objects]


def _write_one(task: tuple[str, int, str, int, int]) -> list[tuple[int, tuple[float, float, float, float]]]:
    path, seed, split, index, size = task
    img, objects = render_image(seed, split, index, size)
    Image.fromarray(img).save(path, "JPEG", quality=JPEG_QUALITY)
    return objects


# ----------------------------------------------------------------------------- COCO json
def _categories() -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)]


def _coco_json(split: str, seed: int, size: int, per_image: list[list]) -> dict[str, Any]:
    images, annotations = [], []
    for index, objects in enumerate(per_image):
        images.append({"id": index + 1, "file_name": f"{index:06d}.jpg", "width": size, "height": size})
        for label, (x1, y1, x2, y2) in objects:
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": label + 1, "bbox": [x1, y1, w, h],
                                "area": w * h, "iscrowd": 0})
    info = {"description": "edge_compress synthetic shapes", "version": "1",
            "split": split, "seed": seed, "image_size": size}
    return {"info": info, "images": images, "annotations": annotations, "categories": _categories()}


def _write_split(root: Path, split: str, count: int, seed: int, size: int, pool: Any) -> None:
    img_dir = root / "images" / split
    img_dir.mkdir(parents=True)
    tasks = [(str(img_dir / f"{i:06d}.jpg"), seed, split, i, size) for i in range(count)]
    per_image = list(pool.imap(_write_one, tasks, chunksize=16) if pool else map(_write_one, tasks))
    ann = root / "annotations" / f"instances_{split}.json"
    ann.parent.mkdir(exist_ok=True)
    ann.write_text(json.dumps(_coco_json(split, seed, size, per_image)) + "\n")


# ----------------------------------------------------------------------------- atomic dir
def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"synthetic dataset output '{out}' exists and is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(
            f"synthetic dataset output '{out}' already exists and is not empty; pick another "
            "path or pass overwrite=True to replace it")


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished tree onto ``out``; an existing ``out`` is first moved
    aside (same directory, so both renames are atomic) and deleted only after."""
    if not out.exists():
        os.replace(tmp, out)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.replace(out, trash / "old")
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(trash / "old", out)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _check_args(num_train: int, num_val: int, image_size: int, seed: int, workers: int | None) -> None:
    for name, value in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"generate_synthetic: {name}={value!r}; expected an int >= 0")
    if not isinstance(image_size, int) or image_size < 64:
        raise ConfigError(f"generate_synthetic: image_size={image_size!r}; expected an int >= 64 "
                          f"(objects range from {MIN_OBJECT_PX:g} px to half the image)")
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"generate_synthetic: seed={seed!r}; expected an int >= 0")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ConfigError(f"generate_synthetic: workers={workers!r}; expected None (automatic) or an int >= 1")


def _default_workers(total: int) -> int:
    return min(2, os.cpu_count() or 1) if total >= 200 else 1


def generate_synthetic(out_dir: str | os.PathLike, num_train: int = 2000, num_val: int = 300,
                       image_size: int = 320, seed: int = 0, overwrite: bool = False,
                       workers: int | None = None) -> SynthPaths:
    """Write the synthetic COCO-format dataset under ``out_dir`` and return its paths.

    Everything is written into a temporary directory next to ``out_dir`` and
    renamed into place at the end, so ``out_dir`` is either absent/untouched or
    complete. A non-empty ``out_dir`` is refused unless ``overwrite=True``.
    ``workers`` processes render images (default: up to 2 for >= 200 images);
    the output does not depend on it.
    """
    _check_args(num_train, num_val, image_size, seed, workers)
    out = Path(out_dir).absolute()
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    n_workers = workers or _default_workers(num_train + num_val)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is not
    try:
        # forkserver, not fork: a caller that already runs runtime threads (OpenVINO's TBB pool, ONNX
        # Runtime, torch) can crash when forked mid-flight (seen: SIGSEGV after the backend tests)
        with (mp.get_context("forkserver").Pool(n_workers) if n_workers > 1 else nullcontext()) as pool:
            for split, count in (("train", num_train), ("val", num_val)):
                _write_split(tmp, split, count, seed, image_size, pool)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SynthPaths.under(out)
