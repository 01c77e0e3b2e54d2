"""The synthetic COCO-format generator: determinism, validity, difficulty, atomic writes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from edge_compress.data import synth
from edge_compress.data.synth import CLASS_NAMES, MAX_OBJECTS, MIN_VISIBLE, generate_synthetic, render_image
from edge_compress.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def synth320(tmp_path_factory: pytest.TempPathFactory) -> synth.SynthPaths:
    """A few hundred 320 px images: enough for every class and size bucket to occur."""
    return generate_synthetic(tmp_path_factory.mktemp("s320") / "ds", num_train=260, num_val=40,
                              image_size=320, seed=3, workers=2)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _anns(paths: synth.SynthPaths) -> list[dict]:
    return json.loads(paths.train_ann.read_text())["annotations"] + json.loads(paths.val_ann.read_text())["annotations"]


# ----------------------------------------------------------------------------- determinism
def test_same_seed_is_byte_identical_whatever_the_worker_count(tmp_path: Path) -> None:
    a = generate_synthetic(tmp_path / "a", num_train=10, num_val=4, image_size=96, seed=5, workers=1)
    b = generate_synthetic(tmp_path / "b", num_train=10, num_val=4, image_size=96, seed=5, workers=2)
    ta, tb = _tree(a.root), _tree(b.root)
    assert sorted(ta) == sorted(tb)
    assert len([k for k in ta if k.endswith(".jpg")]) == 14
    assert ta == tb


def test_different_seeds_differ(tmp_path: Path) -> None:
    a = generate_synthetic(tmp_path / "a", num_train=4, num_val=1, image_size=96, seed=1)
    b = generate_synthetic(tmp_path / "b", num_train=4, num_val=1, image_size=96, seed=2)
    assert a.train_ann.read_text() != b.train_ann.read_text()
    assert all((a.train_images / n).read_bytes() != (b.train_images / n).read_bytes()
               for n in ("000000.jpg", "000003.jpg"))


def test_image_depends_only_on_seed_split_index() -> None:
    img, objs = render_image(7, "train", 11, 128)
    render_image(7, "train", 12, 128)  # rendering something else in between changes nothing
    img2, objs2 = render_image(7, "train", 11, 128)
    assert np.array_equal(img, img2) and objs == objs2
    assert not np.array_equal(img, render_image(7, "val", 11, 128)[0])


# ----------------------------------------------------------------------------- validity
def test_annotations_are_valid_coco(synth320: synth.SynthPaths) -> None:
    for ann_file in (synth320.train_ann, synth320.val_ann):
        data = json.loads(ann_file.read_text())
        assert set(data) >= {"info", "images", "annotations", "categories"}
        assert [c["id"] for c in data["categories"]] == list(range(1, len(CLASS_NAMES) + 1))
        assert [c["name"] for c in data["categories"]] == list(CLASS_NAMES)
        images = {im["id"]: im for im in data["images"]}
        assert len(images) == len(data["images"])
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
        for a in data["annotations"]:
            im = images[a["image_id"]]
            x, y, w, h = a["bbox"]
            assert 1 <= a["category_id"] <= len(CLASS_NAMES) and a["iscrowd"] == 0
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= im["width"] and y + h <= im["height"]
            assert a["area"] == pytest.approx(w * h)
            assert all(float(v).is_integer() for v in a["bbox"])  # tight pixel-extent boxes
        for im in data["images"]:
            assert (ann_file.parent.parent / "images" / data["info"]["split"] / im["file_name"]).is_file()


def test_objects_per_image_within_1_to_12(synth320: synth.SynthPaths) -> None:
    data = json.loads(synth320.train_ann.read_text())
    per_image = Counter(a["image_id"] for a in data["annotations"])
    counts = [per_image[im["id"]] for im in data["images"]]
    assert min(counts) >= 1 and max(counts) <= MAX_OBJECTS
    assert np.mean(counts) > 3  # not mostly single-object images


def test_every_class_and_every_coco_size_occurs(synth320: synth.SynthPaths) -> None:
    anns = _anns(synth320)
    per_class = Counter(a["category_id"] for a in anns)
    assert set(per_class) == set(range(1, len(CLASS_NAMES) + 1))
    assert min(per_class.values()) > 0.3 * len(anns) / len(CLASS_NAMES)  # roughly balanced
    areas = np.array([a["area"] for a in anns])
    small, large = np.mean(areas < 32 ** 2), np.mean(areas > 96 ** 2)
    medium = 1 - small - large
    assert small > 0.15 and medium > 0.15 and large > 0.05, (small, medium, large)


def test_pycocotools_loads_and_scores_ground_truth_as_perfect(synth320: synth.SynthPaths) -> None:
    gt = COCO(str(synth320.val_ann))
    assert len(gt.getCatIds()) == len(CLASS_NAMES) and len(gt.getImgIds()) == 40
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt.dataset["annotations"]]
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate(), ev.accumulate(), ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)
    assert min(ev.stats[3:6]) == pytest.approx(1.0)  # small, medium and large all present


def test_every_drawn_object_stays_mostly_visible() -> None:
    for index in range(20):
        rng = np.random.default_rng([0, 0, index])
        synth._background(rng, 160)
        objects = synth._place_objects(rng, 160)
        owner = np.full((160, 160), -1)
        for k, obj in enumerate(objects):
            owner[obj.region][obj.mask] = k
        for k, obj in enumerate(objects):
            visible = int((owner == k).sum())
            assert visible == obj.visible and visible >= MIN_VISIBLE * obj.total


# ----------------------------------------------------------------------------- atomic output
def _leftovers(parent: Path, keep: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != keep)


def test_refuses_a_non_empty_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match=r"not empty.*overwrite=True") as err:
        generate_synthetic(out, num_train=2, num_val=1, image_size=64)
    assert str(out) in str(err.value)
    assert (out / "precious.txt").read_text() == "keep me"
    assert _leftovers(tmp_path, "ds") == []


def test_overwrite_replaces_and_empty_dir_is_fine(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    generate_synthetic(out, num_train=2, num_val=1, image_size=64)  # empty dir: allowed
    (out / "stale.txt").write_text("old")
    paths = generate_synthetic(out, num_train=3, num_val=1, image_size=64, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert len(json.loads(paths.train_ann.read_text())["images"]) == 3
    assert _leftovers(tmp_path, "ds") == []


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(task):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_write_one", boom)
    with pytest.raises(RuntimeError):
        generate_synthetic(tmp_path / "ds", num_train=2, num_val=1, image_size=64, workers=1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs", [{"num_train": -1}, {"image_size": 32}, {"seed": -3}, {"workers": 0}])
def test_bad_arguments_are_config_errors(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        generate_synthetic(tmp_path / "ds", **{"num_train": 1, "num_val": 1, **kwargs})
