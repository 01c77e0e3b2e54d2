"""The detector zoo: YOLO-tiny, PP-PicoDet style and SSDLite families."""

from edge_compress.models.base import Detector, InputSpec
from edge_compress.models.postprocess import Detections, PostProcessConfig
from edge_compress.models.registry import create_detector, list_detectors, zoo_entry
from edge_compress.models.summary import ModelSummary, summarize

__all__ = ["Detector", "InputSpec", "Detections", "PostProcessConfig", "create_detector",
           "list_detectors", "zoo_entry", "ModelSummary", "summarize"]
