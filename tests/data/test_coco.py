"""CocoDataset: strict validation, letterbox geometry, reproducible augmentation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from edge_compress.data import CLASS_NAMES, AugmentConfig, CocoDataset, collate, generate_synthetic
from edge_compress.data.transforms import unletterbox_boxes
from edge_compress.errors import DataError


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory):
    return generate_synthetic(tmp_path_factory.mktemp("coco") / "ds", num_train=12, num_val=3,
                              image_size=128, seed=11)


# ----------------------------------------------------------------------------- a hand-made set
def _hand_made(root: Path, mutate: Callable[[dict], Any] | None = None) -> tuple[Path, Path]:
    """Two RGB PNGs (200x100 and 64x64) with three boxes; ``mutate`` edits the json."""
    img_dir = root / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    wide = np.full((100, 200, 3), 40, np.uint8)
    wide[30:70, 20:90] = 250
    Image.fromarray(wide).save(img_dir / "wide.png")
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(img_dir / "square.png")
    data = {
        "images": [{"id": 7, "file_name": "wide.png", "width": 200, "height": 100},
                   {"id": 9, "file_name": "square.png", "width": 64, "height": 64}],
        "categories": [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [20, 30, 70, 40], "area": 2800, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [150, 10, 30, 80], "area": 2400, "iscrowd": 0},
            {"id": 3, "image_id": 9, "category_id": 2, "bbox": [0, 0, 64, 64], "area": 4096, "iscrowd": 0},
        ],
    }
    if mutate is not None:
        mutate(data)
    ann = root / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, img_dir


def test_round_trip_on_a_generated_set(small_set) -> None:
    ds = CocoDataset(small_set.train_ann, small_set.train_images, input_size=(160, 192))
    data = json.loads(small_set.train_ann.read_text())
    assert len(ds) == 12 and ds.image_ids == [im["id"] for im in data["images"]]
    assert ds.class_names == CLASS_NAMES and ds.cat_ids == list(range(1, 11))
    assert ds.coco_gt_path == small_set.train_ann
    for i in (0, 5, 11):
        image, target, meta = ds[i]
        assert image.shape == (3, 160, 192) and image.dtype == torch.uint8
        assert target.dtype == torch.float32 and target.shape[1] == 5
        assert meta == {"image_id": ds.image_ids[i], "orig_w": 128, "orig_h": 128,
                        "scale": 1.25, "pad_x": 16, "pad_y": 0}
        anns = [a for a in data["annotations"] if a["image_id"] == meta["image_id"]]
        want = np.array([[a["category_id"] - 1, a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                          a["bbox"][1] + a["bbox"][3]] for a in anns], np.float32)
        want[:, 1:] = want[:, 1:] * 1.25 + [16, 0, 16, 0]
        np.testing.assert_allclose(target.numpy(), want, rtol=1e-6)


def test_non_square_letterbox_maps_boxes_and_back(tmp_path: Path) -> None:
    ds = CocoDataset(*_hand_made(tmp_path), input_size=320)
    assert ds.cat_ids == [2, 5] and ds.class_names == ("dog", "cat")  # sorted ids -> labels
    image, target, meta = ds[0]
    assert (meta["scale"], meta["pad_x"], meta["pad_y"]) == (1.6, 0, 80)
    np.testing.assert_allclose(target[0].numpy(), [1, 32, 128, 144, 192], rtol=1e-6)
    np.testing.assert_allclose(target[1].numpy(), [0, 240, 96, 288, 224], rtol=1e-6)
    x1, y1, x2, y2 = target[0, 1:].int().tolist()
    assert (image[:, y1 + 1:y2 - 1, x1 + 1:x2 - 1] > 240).all()          # the white box is there
    assert (image[:, :80] == 114).all() and (image[:, 240:] == 114).all()  # letterbox padding
    back = unletterbox_boxes(target[:, 1:].numpy(), meta["scale"], meta["pad_x"], meta["pad_y"])
    np.testing.assert_allclose(back, [[20, 30, 90, 70], [150, 10, 180, 90]], atol=1e-4)


def test_crowd_and_zero_size_boxes_are_not_targets(tmp_path: Path) -> None:
    def mutate(d: dict) -> None:
        d["annotations"][0]["iscrowd"] = 1
        d["annotations"][2]["bbox"] = [3, 3, 0, 10]

    with pytest.warns(UserWarning, match="skipped 1 annotation"):
        ds = CocoDataset(*_hand_made(tmp_path, mutate), input_size=320)
    assert ds.skipped == {"crowd": 1, "zero_size": 1}
    assert ds[0][1][:, 0].tolist() == [0.0] and ds[1][1].shape == (0, 5)


# ----------------------------------------------------------------------------- bad inputs
def _del(key: str) -> Callable[[dict], None]:
    return lambda d: d.pop(key)


def _set(path: tuple, value: Any) -> Callable[[dict], None]:
    def f(d: dict) -> None:
        obj = d
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value
    return f


BAD_JSON = [
    ("missing_key", _del("categories"), r"missing top-level key\(s\) \['categories'\]"),
    ("unknown_category", _set(("annotations", 1, "category_id"), 4),
     r"annotations\[1\] \(id=2\) has category_id=4.*valid ids: \[2, 5\]"),
    ("unknown_image", _set(("annotations", 2, "image_id"), 99), r"annotations\[2\] \(id=3\) has image_id=99"),
    ("negative_width", _set(("annotations", 0, "bbox"), [20, 30, -5, 40]), r"annotations\[0\].*negative width"),
    ("negative_x", _set(("annotations", 0, "bbox"), [-2, 30, 5, 40]), r"annotations\[0\].*negative coordinate"),
    ("three_numbers", _set(("annotations", 0, "bbox"), [1, 2, 3]), r"annotations\[0\].*expected 4 finite numbers"),
    ("nan", _set(("annotations", 0, "bbox"), [1, 2, float("nan"), 3]), r"expected 4 finite numbers"),
    ("outside", _set(("annotations", 2, "bbox"), [64, 0, 3, 3]), r"annotations\[2\].*outside its 64x64 image"),
    ("dup_image", _set(("images", 1, "id"), 7), r"images\[1\] \(id=7\) duplicates image id 7"),
    ("dup_category", _set(("categories", 1, "id"), 5), r"categories\[1\] \(id=5\) duplicates category id 5"),
    ("dup_annotation", _set(("annotations", 1, "id"), 1), r"annotations\[1\] \(id=1\) duplicates annotation id"),
    ("no_file_name", lambda d: d["images"][0].pop("file_name"), r"images\[0\] \(id=7\) is missing \['file_name'\]"),
    ("bad_width", _set(("images", 0, "width"), 0), r"images\[0\].*width=0"),
    ("no_ann_id", lambda d: d["annotations"][0].pop("id"), r"annotations\[0\] has no integer 'id'"),
    ("not_a_list", _set(("annotations",), {}), r"'annotations' is a dict, expected a list"),
]


@pytest.mark.parametrize("name, mutate, pattern", BAD_JSON, ids=[b[0] for b in BAD_JSON])
def test_bad_json_raises_data_error_naming_file_and_field(tmp_path: Path, name: str, mutate, pattern: str) -> None:
    ann, img_dir = _hand_made(tmp_path, mutate)
    with pytest.raises(DataError, match=pattern) as err:
        CocoDataset(ann, img_dir)
    assert str(ann) in str(err.value)


def test_missing_and_malformed_annotation_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        CocoDataset(tmp_path / "nope.json", tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        CocoDataset(bad, tmp_path)


def test_missing_image_files_are_listed_at_construction(tmp_path: Path) -> None:
    ann, img_dir = _hand_made(tmp_path)
    (img_dir / "square.png").unlink()
    with pytest.raises(DataError, match=r"1 of 2 image files are missing") as err:
        CocoDataset(ann, img_dir)
    assert str(img_dir / "square.png") in str(err.value)


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("P", "PNG")])
def test_non_rgb_images_are_refused_not_converted(tmp_path: Path, mode: str, fmt: str) -> None:
    ann, img_dir = _hand_made(tmp_path)
    Image.new("RGB", (64, 64), (200, 10, 10)).convert(mode).save(img_dir / "square.png", fmt)
    ds = CocoDataset(ann, img_dir)
    with pytest.raises(DataError, match=rf"square\.png: image mode is '{mode}'.*convert\('RGB'\)"):
        ds[1]


def test_decoded_size_must_match_the_json(tmp_path: Path) -> None:
    ann, img_dir = _hand_made(tmp_path)
    Image.new("RGB", (60, 64)).save(img_dir / "square.png")
    with pytest.raises(DataError, match=r"square\.png: decoded size 60x64 differs.*64x64"):
        CocoDataset(ann, img_dir)[1]


def test_undecodable_image(tmp_path: Path) -> None:
    ann, img_dir = _hand_made(tmp_path)
    (img_dir / "square.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"square\.png: cannot be decoded"):
        CocoDataset(ann, img_dir)[1]


# ----------------------------------------------------------------------------- augment + epochs
def _same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


def test_augmented_samples_depend_only_on_seed_epoch_index(small_set) -> None:
    make = lambda: CocoDataset(small_set.train_ann, small_set.train_images, 128, augment=AugmentConfig(), seed=4)
    ds, other = make(), make()
    ds.set_epoch(2)
    other.set_epoch(2)
    other[5], other[1]  # order does not matter
    assert _same(ds[3], other[3]) and _same(ds[3], ds[3])
    assert _same(ds[3], make()[(3, 2)])  # explicit (index, epoch) for persistent workers
    ds.set_epoch(3)
    assert not torch.equal(ds[3][0], other[3][0])
    image, target, _ = ds[3]
    assert (target[:, 1:] >= 0).all() and (target[:, [1, 3]] <= 128).all() and (target[:, [2, 4]] <= 128).all()


def test_dataloader_workers_do_not_change_the_batches(small_set) -> None:
    ds = CocoDataset(small_set.train_ann, small_set.train_images, 128, augment=AugmentConfig(), seed=1)
    ds.set_epoch(1)
    runs = [list(DataLoader(ds, batch_size=4, num_workers=n, collate_fn=collate)) for n in (0, 2)]
    for (im0, t0, m0), (im2, t2, m2) in zip(*runs):
        assert im0.shape == (4, 3, 128, 128) and im0.dtype == torch.uint8
        assert torch.equal(im0, im2) and m0 == m2 and all(torch.equal(a, b) for a, b in zip(t0, t2))


def test_cache_images_returns_the_same_samples(small_set) -> None:
    plain = CocoDataset(small_set.val_ann, small_set.val_images, 160)
    cached = CocoDataset(small_set.val_ann, small_set.val_images, 160, cache_images=True)
    for i in range(len(plain)):
        assert _same(plain[i], cached[i]) and _same(plain[i], cached[i])
    assert len(cached._cache) == len(cached) and not plain._cache


def test_collate_stacks_images_and_lists_targets(small_set) -> None:
    ds = CocoDataset(small_set.val_ann, small_set.val_images, 128)
    images, targets, metas = collate([ds[0], ds[1], ds[2]])
    assert images.shape == (3, 3, 128, 128) and len(targets) == 3 and len(metas) == 3
    assert [m["image_id"] for m in metas] == ds.image_ids[:3]


def test_index_errors(small_set) -> None:
    ds = CocoDataset(small_set.val_ann, small_set.val_images, 128)
    assert _same(ds[-1], ds[len(ds) - 1])
    with pytest.raises(IndexError):
        ds[len(ds)]
