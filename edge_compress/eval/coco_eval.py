"""COCO mAP with pycocotools, for detections from any source.

The evaluator takes plain detections (boxes in original-image pixels), so a
torch model, an ONNX Runtime session or a device's artifact are all scored by
the same code.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping

import numpy as np

from edge_compress.errors import DataError
from edge_compress.models.postprocess import Detections

METRIC_NAMES = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
                "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large")


@dataclass(frozen=True)
class EvalResult:
    ap: float
    ap50: float
    ap75: float
    ap_small: float
    ap_medium: float
    ap_large: float
    ar1: float
    ar10: float
    ar100: float
    ar_small: float
    ar_medium: float
    ar_large: float
    num_images: int
    num_detections: int

    def to_dict(self) -> dict:
        return asdict(self)


def to_coco_results(dets: Mapping[int, Detections], cat_ids: list[int]) -> list[dict]:
    """{image_id: Detections in original pixels, labels 0..C-1} -> COCO result dicts."""
    out = []
    for image_id, d in dets.items():
        xywh = np.asarray(d.boxes, dtype=np.float64).copy()
        xywh[:, 2:] -= xywh[:, :2]
        for box, score, label in zip(xywh, d.scores, d.labels):
            out.append({"image_id": int(image_id), "category_id": int(cat_ids[int(label)]),
                        "bbox": [round(float(v), 3) for v in box], "score": round(float(score), 5)})
    return out


def _load_gt(ann_file):
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(ann_file))


def evaluate_coco(ann_file, results: list[dict], image_ids: Iterable[int] | None = None) -> EvalResult:
    """Score COCO-format results against ground truth ``ann_file`` (bbox AP)."""
    from pycocotools.cocoeval import COCOeval

    gt = _load_gt(ann_file)
    ids = sorted(gt.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    unknown = {r["image_id"] for r in results} - set(gt.getImgIds())
    if unknown:
        raise DataError(f"{ann_file}: detections refer to image ids {sorted(unknown)[:5]} "
                        "that are not in the ground truth; evaluate against the matching annotation file")
    if not results:  # loadRes refuses an empty list: no detections scores zero everywhere
        return EvalResult(*([0.0] * len(METRIC_NAMES)), num_images=len(ids), num_detections=0)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # COCOeval reports -1 where a metric has no ground truth (e.g. no large objects).
    stats = [max(float(s), 0.0) for s in ev.stats]
    return EvalResult(*stats, num_images=len(ids), num_detections=len(results))


def format_stats(r: EvalResult) -> str:
    return (f"AP {r.ap:.3f}  AP50 {r.ap50:.3f}  AP75 {r.ap75:.3f}  "
            f"APs {r.ap_small:.3f}  APm {r.ap_medium:.3f}  APl {r.ap_large:.3f}")
