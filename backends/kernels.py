"""The ``kernels`` backend: our numba kernels run a lowered detector (``edge_compress.lower``).

The artifact is ``graph.json`` + ``weights.npz`` (``edge_compress.kernels.graph``) beside the
manifest. Which kernel each conv runs on comes from ``ExportSource.lowering`` (a
``LoweringConfig`` dict: fp32 | int8 | binary | sparse_csr | sparse_2_4 per layer); without it
an fp32 export is all fp32, and an int8 export puts in int8 exactly the convs the shared QDQ
graph quantizes (so ``keep_fp32`` and the fp32 head outputs mean the same as on the other
backends), on the export flow's calibration ranges.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_compress.backends.base import ExportSource, LayerTiming
from edge_compress.errors import BackendUnavailableError, ConfigError


class KernelsBackend:
    name = "kernels"
    model_file = "graph.json"      # + weights.npz beside it
    install_hint = "pip install 'edge-compress[kernels]' (numba; export also needs the onnx extra)"
    precisions = ("fp32", "int8")
    qdq_activations = "asymmetric"

    def available(self) -> tuple[bool, str]:
        try:
            import numba  # noqa: F401
        except ImportError as e:
            return False, f"numba cannot be imported ({e}); install it with: {self.install_hint}"
        return True, ""

    def runtime_version(self) -> str:
        import numba

        from edge_compress.kernels.graph import FORMAT_VERSION

        return f"edge_compress.kernels graph v{FORMAT_VERSION}, numba {numba.__version__}"

    def export(self, source: ExportSource, out_dir: Path) -> Path:
        from edge_compress.lower import lower

        graph = lower(source.fp32_onnx, self._config(source), calibration=source.calibration,
                      module_map=_module_map(source))
        return graph.save(out_dir)

    def manifest_extra(self, source: ExportSource, out_dir: Path) -> dict[str, Any]:
        from edge_compress.kernels.graph import load_graph

        g = load_graph(out_dir)
        return {"lowering": {"config": g.meta.get("config"), "fallbacks": g.meta.get("fallbacks", {}),
                             "ops": len(g.ops)}}

    def _config(self, source: ExportSource):
        from edge_compress.lower import LoweringConfig

        if source.lowering is not None:
            return source.lowering if isinstance(source.lowering, LoweringConfig) \
                else LoweringConfig.from_dict(source.lowering, source="lowering")
        if source.precision != "int8":
            return LoweringConfig()
        from edge_compress.backends.onnx_export import compute_node_precision, conv_node_names

        convs = set(conv_node_names(source.fp32_onnx))
        int8 = {n: "int8" for n, p in compute_node_precision(source.onnx).items() if p == "int8" and n in convs}
        return LoweringConfig(default="fp32", layers=int8)

    def layer_precision(self, model_path: Path) -> dict[str, str]:
        from edge_compress.kernels.graph import load_graph

        return load_graph(Path(model_path).parent).precision()

    def load(self, artifact_dir: Path, threads: int = 1) -> "KernelsRunner":
        return KernelsRunner(Path(artifact_dir), threads)

    def profile_layers(self, artifact_dir: Path, x: np.ndarray, repeats: int = 20, warmup: int = 3,
                       threads: int = 1) -> list[LayerTiming]:
        runner = KernelsRunner(Path(artifact_dir), threads)
        medians = runner.executor.profile(np.ascontiguousarray(x[:1], np.float32), repeats, warmup)
        types = {op.name: op.type for op in runner.executor.graph.ops}
        return [LayerTiming(name, types[name], us, repeats) for name, us in medians.items()]


def _module_map(source: ExportSource) -> dict[str, str] | None:
    if source.model is None:
        return None
    import onnx

    from edge_compress.quant.qdq import conv_module_map

    return conv_module_map(source.model, onnx.load(str(source.fp32_onnx)))


class KernelsRunner:
    """The executor of one artifact; numba's thread count is set to ``threads`` (process-wide).
    Batches larger than the graph's static batch of 1 run image by image."""

    def __init__(self, artifact_dir: Path, threads: int = 1):
        try:
            import numba
        except ImportError as e:
            raise BackendUnavailableError(f"numba is not installed ({e}); install it with: "
                                          f"{KernelsBackend.install_hint}") from e
        from edge_compress.kernels.executor import Executor
        from edge_compress.kernels.graph import load_graph

        if threads < 1:
            raise ConfigError(f"threads={threads} must be >= 1")
        from edge_compress.kernels.ops import set_blas_threads

        numba.set_num_threads(min(int(threads), numba.config.NUMBA_NUM_THREADS))
        set_blas_threads(threads)
        self.executor = Executor(load_graph(artifact_dir))
        self.batch = self.executor.input_shape[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 4 and x.shape[0] != self.batch:
            return np.concatenate([self.executor.run(x[i:i + self.batch]) for i in range(0, x.shape[0], self.batch)])
        return self.executor.run(x)
