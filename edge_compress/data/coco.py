"""A loader for any COCO-format detection dataset (an instances json + an image folder).

``CocoDataset`` validates the whole json and checks that every image file exists
when it is built, so a bad dataset fails at once with a ``DataError`` naming the
file, the entry and the fix, not halfway through an epoch. Conventions:

* categories: sorted COCO category ids map to contiguous labels ``0..C-1``
  (``cat_ids[label]`` gives the id back, ``class_names`` are in label order);
* targets: ``(n, 5)`` float32 ``[label, x1, y1, x2, y2]`` in letterboxed input
  pixels (the ``Detector.loss`` contract);
* ``iscrowd=1`` annotations are not training targets (they mark regions, not
  instances); pycocotools still reads them from ``coco_gt_path`` when scoring;
* boxes with zero width or height are skipped with one warning (COCO has a few);
  boxes reaching past the image border are clipped to it;
* images must already be 3-channel RGB: other modes are an error, never
  silently converted, so training and deployment see the same pixels.
"""

from __future__ import annotations

import json
import math
import operator
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from edge_compress.data.transforms import (PAD_VALUE, AugmentConfig, augment, letterbox, letterbox_boxes,
                                           letterbox_geometry)
from edge_compress.errors import ConfigError, DataError

REQUIRED_KEYS = ("images", "annotations", "categories")
_MODE_HINTS = {"L": "1-channel greyscale", "LA": "greyscale + alpha", "P": "palette",
               "RGBA": "4-channel RGB + alpha", "CMYK": "4-channel CMYK", "1": "1-bit",
               "I;16": "16-bit greyscale", "I": "32-bit integer", "F": "32-bit float",
               "YCbCr": "YCbCr"}


@dataclass(frozen=True)
class ImageRecord:
    id: int
    file_name: str
    width: int
    height: int


# ----------------------------------------------------------------------------- helpers
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt_ids(ids: Sequence[int], limit: int = 20) -> str:
    ids = sorted(ids)
    return str(ids) if len(ids) <= limit else f"{ids[:limit]}... ({len(ids)} ids)"


def _entry(key: str, index: int, item: Any) -> str:
    has_id = isinstance(item, dict) and "id" in item
    return f"{key}[{index}]" + (f" (id={item['id']!r})" if has_id else "")


# ----------------------------------------------------------------------------- json
def load_coco_json(path: Path) -> dict[str, Any]:
    """Read a COCO json and check its top-level structure."""
    if not path.is_file():
        raise DataError(f"COCO annotation file '{path}' does not exist; pass the path of an "
                        "instances_*.json file (generate one with `generate_synthetic`)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); re-export the annotation file") from e
    if not isinstance(data, dict):
        raise DataError(f"{path}: top level is a {type(data).__name__}, expected a JSON object "
                        f"with keys {list(REQUIRED_KEYS)}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise DataError(f"{path}: missing top-level key(s) {missing}; a COCO instances file needs "
                        f"{list(REQUIRED_KEYS)} (an image set without boxes still needs \"annotations\": [])")
    for key in REQUIRED_KEYS:
        if not isinstance(data[key], list):
            raise DataError(f"{path}: '{key}' is a {type(data[key]).__name__}, expected a list")
    return data


def parse_categories(src: Path, cats: list[Any]) -> tuple[list[int], tuple[str, ...]]:
    """Sorted category ids (label -> id) and their names in label order."""
    names: dict[int, str] = {}
    for i, cat in enumerate(cats):
        where = _entry("categories", i, cat)
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            raise DataError(f"{src}: {where} has no integer 'id'; give every category an integer id")
        if cat["id"] in names:
            raise DataError(f"{src}: {where} duplicates category id {cat['id']}; category ids must be unique")
        names[cat["id"]] = str(cat.get("name", f"category_{cat['id']}"))
    if not names:
        raise DataError(f"{src}: 'categories' is empty; list at least one category")
    ids = sorted(names)
    return ids, tuple(names[i] for i in ids)


def parse_images(src: Path, images: list[Any]) -> list[ImageRecord]:
    records, seen = [], set()
    for i, img in enumerate(images):
        where = _entry("images", i, img)
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            raise DataError(f"{src}: {where} has no integer 'id'; give every image an integer id")
        missing = [k for k in ("file_name", "width", "height") if k not in img]
        if missing:
            raise DataError(f"{src}: {where} is missing {missing}; every image entry needs "
                            "id, file_name, width and height")
        if img["id"] in seen:
            raise DataError(f"{src}: {where} duplicates image id {img['id']}; image ids must be unique")
        w, h = img["width"], img["height"]
        if not (_is_number(w) and _is_number(h) and w == int(w) > 0 and h == int(h) > 0):
            raise DataError(f"{src}: {where} has width={w!r}, height={h!r}; expected positive integers "
                            "(the decoded image size in pixels)")
        seen.add(img["id"])
        records.append(ImageRecord(img["id"], str(img["file_name"]), int(w), int(h)))
    return records


def _check_bbox(src: Path, where: str, bbox: Any, rec: ImageRecord) -> None:
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise DataError(f"{src}: {where} has bbox={bbox!r}; expected 4 finite numbers [x, y, width, height]")
    x, y, w, h = bbox
    if w < 0 or h < 0:
        raise DataError(f"{src}: {where} has bbox={bbox!r} with a negative width or height; COCO boxes "
                        "are [x, y, width, height] (convert [x1, y1, x2, y2] boxes to this form)")
    if x < 0 or y < 0:
        raise DataError(f"{src}: {where} has bbox={bbox!r} with a negative coordinate; clip the box "
                        "to the image (x, y >= 0)")
    if w > 0 and h > 0 and (x >= rec.width or y >= rec.height):  # zero-size boxes are skipped later
        raise DataError(f"{src}: {where} has bbox={bbox!r} starting outside its {rec.width}x{rec.height} "
                        f"image (id={rec.id}); fix the box or the image width/height")


def _check_refs(src: Path, where: str, ann: dict[str, Any], records: dict[int, ImageRecord],
                cat_to_label: dict[int, int]) -> None:
    if not _is_int(ann.get("image_id")) or ann["image_id"] not in records:
        raise DataError(f"{src}: {where} has image_id={ann.get('image_id')!r}, which is not an image id "
                        "in 'images'; fix the annotation or add the image entry")
    if not _is_int(ann.get("category_id")) or ann["category_id"] not in cat_to_label:
        raise DataError(f"{src}: {where} has category_id={ann.get('category_id')!r}, which is not a "
                        f"category id (valid ids: {_fmt_ids(list(cat_to_label))}); fix the annotation "
                        "or add the category to 'categories'")


def parse_annotations(src: Path, anns: list[Any], records: dict[int, ImageRecord],
                      cat_to_label: dict[int, int]) -> tuple[dict[int, np.ndarray], dict[str, int]]:
    """Per image id: ``(n, 5)`` float32 ``[label, x1, y1, x2, y2]`` in original pixels,
    and how many annotations were skipped (``zero_size``, ``crowd``)."""
    rows: dict[int, list[list[float]]] = {i: [] for i in records}
    skipped = {"zero_size": 0, "crowd": 0}
    seen: set[int] = set()
    for i, ann in enumerate(anns):
        where = _entry("annotations", i, ann)
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            raise DataError(f"{src}: {where} has no integer 'id'; give every annotation a unique integer id")
        if ann["id"] in seen:
            raise DataError(f"{src}: {where} duplicates annotation id {ann['id']}; ids must be unique "
                            "(pycocotools indexes annotations by id)")
        seen.add(ann["id"])
        _check_refs(src, where, ann, records, cat_to_label)
        rec = records[ann["image_id"]]
        _check_bbox(src, where, ann.get("bbox"), rec)
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w == 0 or h == 0:
            skipped["zero_size"] += 1
        elif ann.get("iscrowd", 0):
            skipped["crowd"] += 1
        else:
            rows[rec.id].append([cat_to_label[ann["category_id"]], x, y,
                                 min(x + w, rec.width), min(y + h, rec.height)])
    return {k: np.array(v, np.float32).reshape(-1, 5) for k, v in rows.items()}, skipped


def check_image_files(src: Path, image_dir: Path, records: list[ImageRecord], show: int = 5) -> None:
    missing = [str(image_dir / r.file_name) for r in records if not (image_dir / r.file_name).is_file()]
    if missing:
        raise DataError(f"{src}: {len(missing)} of {len(records)} image files are missing under "
                        f"'{image_dir}', e.g. {missing[:show]}; check image_dir or remove those images "
                        "from the json")


# ----------------------------------------------------------------------------- images
def read_rgb(path: Path, rec: ImageRecord | None = None) -> np.ndarray:
    """Decode an image that must be 3-channel RGB (and ``rec``'s size) to HxWx3 uint8."""
    try:
        with Image.open(path) as im:
            if im.mode != "RGB":
                hint = _MODE_HINTS.get(im.mode, "not RGB")
                raise DataError(f"{path}: image mode is '{im.mode}' ({hint}); expected 3-channel RGB. "
                                "Convert the file once, e.g. Image.open(p).convert('RGB').save(p); "
                                "the loader never converts silently")
            if rec is not None and im.size != (rec.width, rec.height):
                raise DataError(f"{path}: decoded size {im.size[0]}x{im.size[1]} differs from the json's "
                                f"width x height {rec.width}x{rec.height} (image id={rec.id}); fix the json "
                                "entry or the file (boxes are in json pixel coordinates)")
            return np.asarray(im)
    except FileNotFoundError as e:
        raise DataError(f"{path}: image file not found; check image_dir") from e
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: cannot be decoded as an image ({e}); re-export or remove it") from e


def collate(batch: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]
            ) -> tuple[torch.Tensor, list[torch.Tensor], list[dict[str, Any]]]:
    """DataLoader collate: images stacked ``(N, 3, H, W)`` uint8; targets and metas as lists."""
    images, targets, metas = zip(*batch)
    return torch.stack(images), list(targets), list(metas)


def _input_size(input_size: int | Sequence[int]) -> tuple[int, int]:
    hw = (input_size, input_size) if _is_int(input_size) else tuple(input_size)
    if len(hw) != 2 or not all(_is_int(v) and v > 0 for v in hw):
        raise ConfigError(f"CocoDataset input_size={input_size!r}: expected an int or (height, width) "
                          "of positive ints, e.g. (320, 320)")
    return hw[0], hw[1]


# ----------------------------------------------------------------------------- dataset
class CocoDataset(Dataset):
    """COCO-format detection dataset: letterboxed uint8 images and ``[label, xyxy]`` targets.

    ``dataset[i]`` is ``(image (3, H, W) uint8, target (n, 5) float32, meta)`` with
    ``meta = dict(image_id, orig_w, orig_h, scale, pad_x, pad_y)`` describing the
    letterbox (``x_orig = (x - pad_x) / scale``; with ``augment`` it still describes
    only the letterbox, augmented samples are for training). With ``augment``, sample ``i`` of
    epoch ``e`` is drawn from ``np.random.default_rng((seed, e, i))``, so it does not
    depend on worker count or order. Call ``set_epoch(e)`` before iterating an epoch;
    a persistent DataLoader worker keeps the epoch it was created with, so with
    ``persistent_workers=True`` index the dataset with ``(i, epoch)`` tuples instead
    (from a sampler). ``cache_images`` keeps decoded letterboxed images in memory
    (per process; about H*W*3 bytes each).
    """

    def __init__(self, ann_file: str | os.PathLike, image_dir: str | os.PathLike,
                 input_size: int | tuple[int, int] = (320, 320), augment: AugmentConfig | None = None,
                 seed: int = 0, cache_images: bool = False):
        if augment is not None and not isinstance(augment, AugmentConfig):
            raise ConfigError(f"CocoDataset augment={augment!r}: expected an AugmentConfig or None")
        if not _is_int(seed) or seed < 0:
            raise ConfigError(f"CocoDataset seed={seed!r}: expected an int >= 0")
        self.ann_file, self.image_dir = Path(ann_file), Path(image_dir)
        self.input_h, self.input_w = _input_size(input_size)
        self.augment, self.seed, self.cache_images, self.epoch = augment, seed, cache_images, 0
        data = load_coco_json(self.ann_file)
        self.cat_ids, self.class_names = parse_categories(self.ann_file, data["categories"])
        self.records = parse_images(self.ann_file, data["images"])
        self.image_ids = [r.id for r in self.records]
        cat_to_label = {c: i for i, c in enumerate(self.cat_ids)}
        self._targets, self.skipped = parse_annotations(
            self.ann_file, data["annotations"], {r.id: r for r in self.records}, cat_to_label)
        check_image_files(self.ann_file, self.image_dir, self.records)
        self._cache: dict[int, np.ndarray] = {}
        self._warn_skipped()

    def _warn_skipped(self) -> None:
        if self.skipped["zero_size"]:
            warnings.warn(f"{self.ann_file}: skipped {self.skipped['zero_size']} annotation(s) with zero "
                          "width or height", stacklevel=3)

    @property
    def coco_gt_path(self) -> Path:
        """The annotation file pycocotools should score against."""
        return self.ann_file

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        if not _is_int(epoch) or epoch < 0:
            raise ConfigError(f"set_epoch({epoch!r}): expected an int >= 0")
        self.epoch = epoch

    def image_path(self, i: int) -> Path:
        return self.image_dir / self.records[i].file_name

    def targets_original(self, i: int) -> np.ndarray:
        """``(n, 5)`` ``[label, x1, y1, x2, y2]`` in original image pixels (a copy)."""
        return self._targets[self.records[i].id].copy()

    def _letterboxed(self, i: int) -> np.ndarray:
        cached = self._cache.get(i)
        if cached is not None:
            return cached
        img, _, _, _ = letterbox(read_rgb(self.image_path(i), self.records[i]),
                                 self.input_h, self.input_w, PAD_VALUE)
        if self.cache_images:
            img.flags.writeable = False
            self._cache[i] = img
        return img

    def _index(self, index: int | tuple[int, int]) -> tuple[int, int]:
        i, epoch = index if isinstance(index, tuple) else (index, self.epoch)
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"CocoDataset index {i} out of range for {len(self)} images")
        return i % len(self), int(epoch)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        i, epoch = self._index(index)
        rec = self.records[i]
        img = self._letterboxed(i)
        geo = letterbox_geometry(rec.height, rec.width, self.input_h, self.input_w)
        scale, pad_x, pad_y = geo.scale, geo.pad_x, geo.pad_y
        target = self._targets[rec.id]
        boxes, labels = letterbox_boxes(target[:, 1:], scale, pad_x, pad_y), target[:, 0]
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, epoch, i))
            img, boxes, labels = augment(img, boxes, labels, self.augment, rng)
        out = np.concatenate([labels[:, None], boxes], 1).astype(np.float32)
        meta = {"image_id": rec.id, "orig_w": rec.width, "orig_h": rec.height,
                "scale": scale, "pad_x": pad_x, "pad_y": pad_y}
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))), torch.from_numpy(out), meta

    def __repr__(self) -> str:
        return (f"CocoDataset('{self.ann_file}', {len(self)} images, {self.num_classes} classes, "
                f"input {self.input_h}x{self.input_w}, augment={'on' if self.augment else 'off'})")
