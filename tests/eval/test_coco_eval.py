"""COCO evaluation with pycocotools on hand-made ground truth."""

import json

import numpy as np
import pytest

from edge_compress.errors import DataError
from edge_compress.eval import evaluate_coco, to_coco_results
from edge_compress.models.postprocess import Detections


@pytest.fixture
def gt_file(tmp_path):
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(1, 6):
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 320, "height": 320})
        for _ in range(3):
            x, y = rng.uniform(0, 200, 2)
            w, h = rng.choice([12, 50, 120]), rng.choice([12, 50, 120])  # small, medium, large
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.choice([3, 7])),
                         "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0})
    doc = {"images": images, "annotations": anns,
           "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}
    p = tmp_path / "gt.json"
    p.write_text(json.dumps(doc))
    return p, doc


def _gt_as_detections(doc, cat_ids):
    dets = {}
    for img in doc["images"]:
        anns = [a for a in doc["annotations"] if a["image_id"] == img["id"]]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns], np.float32)
        labels = np.array([cat_ids.index(a["category_id"]) for a in anns])
        dets[img["id"]] = Detections(boxes, np.ones(len(anns), np.float32), labels)
    return dets


def test_ground_truth_as_detections_scores_one(gt_file):
    path, doc = gt_file
    r = evaluate_coco(path, to_coco_results(_gt_as_detections(doc, [3, 7]), [3, 7]))
    for k in ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"):
        assert getattr(r, k) == pytest.approx(1.0), k


def test_wrong_classes_score_zero_and_empty_is_zero(gt_file):
    path, doc = gt_file
    swapped = {k: Detections(d.boxes, d.scores, 1 - d.labels) for k, d in _gt_as_detections(doc, [3, 7]).items()}
    assert evaluate_coco(path, to_coco_results(swapped, [3, 7])).ap50 < 0.5
    assert evaluate_coco(path, []).ap == 0.0


def test_shifted_boxes_lower_ap75_more_than_ap50(gt_file):
    path, doc = gt_file
    dets = _gt_as_detections(doc, [3, 7])
    shifted = {}
    for k, d in dets.items():
        w = d.boxes[:, 2] - d.boxes[:, 0]
        b = d.boxes.copy()
        b[:, [0, 2]] += 0.15 * w[:, None]  # IoU ~0.74: a hit at 0.5, a miss at 0.75
        shifted[k] = Detections(b, d.scores, d.labels)
    r = evaluate_coco(path, to_coco_results(shifted, [3, 7]))
    assert r.ap50 == pytest.approx(1.0) and r.ap75 == pytest.approx(0.0)


def test_unknown_image_id_is_an_error(gt_file):
    path, _ = gt_file
    res = [{"image_id": 99, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}]
    with pytest.raises(DataError, match="image ids \\[99\\]"):
        evaluate_coco(path, res)
