"""Run a predictor over a dataset and score it with pycocotools."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from edge_compress.data.transforms import normalize  # noqa: F401  (re-exported; NumPy only)
from edge_compress.eval.coco_eval import EvalResult, evaluate_coco, to_coco_results
from edge_compress.models.postprocess import Detections, unletterbox

# Low threshold for mAP: the PR curve needs the low-confidence tail too.
EVAL_SCORE_THRESH = 0.01

Predictor = Callable[[np.ndarray], list[Detections]]


def torch_predictor(model, score_thresh: float = EVAL_SCORE_THRESH) -> Predictor:
    """A predictor running ``model`` in torch and the shared NumPy post-process."""

    def predict(images_u8: np.ndarray) -> list[Detections]:
        x = torch.from_numpy(normalize(images_u8, model.input_spec)).to(model.priors_t.device)
        return model.predict(x, score_thresh=score_thresh)

    return predict


def predict_dataset(predict: Predictor, dataset, batch_size: int = 16) -> dict[int, Detections]:
    """Detections per image id, mapped back to original-image pixels."""
    from edge_compress.data.coco import collate

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    out: dict[int, Detections] = {}
    for images, _targets, metas in loader:
        for det, m in zip(predict(images.numpy()), metas):
            out[m["image_id"]] = unletterbox(det, m["scale"], m["pad_x"], m["pad_y"], m["orig_w"], m["orig_h"])
    return out


def evaluate_predictor(predict: Predictor, dataset, batch_size: int = 16) -> EvalResult:
    dets = predict_dataset(predict, dataset, batch_size)
    return evaluate_coco(dataset.coco_gt_path, to_coco_results(dets, dataset.cat_ids), image_ids=dets.keys())


def evaluate_model(model, dataset, batch_size: int = 16) -> EvalResult:
    """COCO mAP of a torch detector on a ``CocoDataset`` (no augmentation)."""
    return evaluate_predictor(torch_predictor(model), dataset, batch_size)
