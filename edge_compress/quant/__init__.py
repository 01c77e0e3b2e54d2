"""int8 post-training quantization: calibrate once on the fp32 ONNX graph, materialise per backend."""

from edge_compress.quant.calibrate import CalibrationTable, calibrate, calibration_images
from edge_compress.quant.config import QuantConfig

__all__ = ["CalibrationTable", "QuantConfig", "calibrate", "calibration_images"]
