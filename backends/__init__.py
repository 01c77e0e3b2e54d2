"""Backends: one module per runtime (ONNX Runtime, OpenVINO, LiteRT, TensorRT, kernels)."""
