"""Training: one loop for every zoo family."""

from edge_compress.train.checkpoint import load_detector, save_checkpoint
from edge_compress.train.config import TrainConfig
from edge_compress.train.trainer import TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train", "load_detector", "save_checkpoint"]
