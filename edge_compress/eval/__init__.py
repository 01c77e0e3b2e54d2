"""Evaluation: COCO mAP (pycocotools) for detections from any source.

This package's ``coco_eval`` needs only NumPy and pycocotools; ``runner`` adds
the torch-model loop.
"""

from edge_compress.eval.coco_eval import EvalResult, evaluate_coco, format_stats, to_coco_results

__all__ = ["EvalResult", "evaluate_coco", "format_stats", "to_coco_results"]
