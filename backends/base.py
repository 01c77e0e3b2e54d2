"""The backend protocol: what every runtime module under backends/ provides.

A backend knows one runtime and its artifact files, never compression or
search. Its SDK is imported inside the methods, so listing backends and asking
``available()`` never crash on a machine without that runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Runner(Protocol):
    """A loaded model: float32 ``(N, 3, H, W)`` network input -> raw ``(N, P, K)`` head output."""

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class LayerTiming:
    """Per-layer time of one runtime node over the measured runs (warm-up excluded).

    ``name`` is the node as the runtime executes it, after the runtime's own graph
    optimisations (fused nodes carry the runtime's name, not the ONNX node's)."""

    name: str
    op_type: str
    median_us: float
    samples: int


@dataclass(frozen=True)
class ExportSource:
    """What a backend turns into its artifact files.

    ``onnx`` is the graph to deploy: the fp32 graph, or for int8 the QDQ graph the
    export flow materialised from the shared calibration table in the backend's
    ``qdq_activations`` format. ``fp32_onnx`` is always the float graph. ``model`` is
    the torch detector when there is one (None for a user's ONNX file), for
    converters that start from torch. ``calibration`` (tensor -> (lo, hi) of the
    fp32 graph) and ``calibration_inputs`` (float32 ``(1, C, H, W)`` arrays) are there
    for converters that must place the same ranges in their own graph.
    """

    onnx: Path
    fp32_onnx: Path
    precision: str = "fp32"                      # "fp32" | "int8"
    model: Any | None = None
    calibration: dict[str, tuple[float, float]] | None = None
    calibration_inputs: tuple[np.ndarray, ...] = field(default=(), repr=False)
    keep_fp32: tuple[str, ...] = ()              # ONNX node names left in float (int8 only)
    lowering: dict | None = None                 # per-layer kernel choice (LoweringConfig dict; kernels backend)


class Backend(Protocol):
    name: str
    model_file: str      # the model file's name inside an artifact folder (the entry file, e.g.
                         # OpenVINO's model.xml, when a backend writes several)
    install_hint: str    # how to install the runtime, quoted by every "not available" error
    precisions: tuple[str, ...]   # what export() accepts: ("fp32", "int8")
    qdq_activations: str          # int8 graphs it wants: "asymmetric" (uint8 + zero point) or
                                  # "symmetric" (int8, zero point 0: TensorRT)

    def available(self) -> tuple[bool, str]:
        """(True, "") when the runtime can load and run models here, else (False, why + how to install)."""

    def runtime_version(self) -> str:
        """The runtime's version string, recorded in the manifest."""

    def export(self, source: ExportSource, out_dir: Path) -> Path:
        """Write ``source`` as ``out_dir / model_file`` (plus any side files); returns that path."""

    def layer_precision(self, model_path: Path) -> dict[str, str]:
        """Per-layer precision of an exported model file, keyed by the layer's node name."""

    def load(self, artifact_dir: Path, threads: int = 1) -> Runner:
        """A runner for the model file in ``artifact_dir`` (the device side: no torch)."""

    def profile_layers(self, artifact_dir: Path, x: np.ndarray, repeats: int = 20, warmup: int = 3,
                       threads: int = 1) -> list[LayerTiming]:
        """Run ``x`` ``warmup + repeats`` times with the runtime's profiler on; per-node medians
        of the measured runs, in execution order."""
