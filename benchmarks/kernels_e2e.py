"""End-to-end rows of benchmarks/kernels.py: compressed yolo_tiny detectors lowered to our kernels.

Two detectors, each exported as a ``kernels`` artifact and timed against the uncompressed
detector at fp32 on ONNX Runtime (alternating blocks, medians, same thread count), with the
mAP of both measured through their runtimes (pycocotools) on the generated val set:

- ``binary_backbone``: XNOR-Net binarised backbone (``compress.binary``, stem and head outputs
  kept float), fine-tuned; every binarised conv lowered to the XNOR-popcount kernel.
- ``sparse80``: 80% magnitude-pruned convs (every conv but the head outputs), fine-tuned with
  the masks held; each conv at most half dense lowered to the CSR kernel.

Full mode uses the zoo benchmark's trained 320 px yolo_tiny and compresses it once (cached under
``runs/bench_kernels``; the binary one is taken from benchmarks/compression.py's run when there is
one). Quick mode compresses the shipped 128 px yolo_tiny without fine-tuning: its mAP is not
meaningful.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

RECIPES = {
    "binary_backbone": {"method": "binary", "config": {}, "epochs": 3, "lowering": {"default": "binary"}},
    "sparse80": {"method": "magnitude", "config": {"sparsity": 0.8}, "epochs": 1,
                 "lowering": {"default": "sparse_csr"}},
}


def _compressed(name: str, spec: dict[str, Any], baseline, data: Path, cache: Path, quick: bool):
    """The compressed detector: the cached checkpoint, else compress (+ fine-tune in full mode) now."""
    from edge_compress.compress.recipe import Recipe, compress
    from edge_compress.train.checkpoint import load_detector

    step = {"method": spec["method"], "config": spec["config"]}
    if not quick:
        step["finetune"] = {"epochs": spec["epochs"], "batch_size": 16, "lr": 1e-3, "warmup_iters": 50}
    found = sorted((ROOT / "runs" / "bench_compression").glob("*/yolo_tiny/binary/model.pt")) \
        if name == "binary_backbone" and not quick else []
    ckpt = found[-1] if found else cache / name / "model.pt"
    if not ckpt.is_file():
        how = "no fine-tune" if quick else f"{spec['epochs']} epoch fine-tune"
        print(f"  compressing yolo_tiny: {name} ({how})", flush=True)
        compress(copy.deepcopy(baseline), Recipe.from_dict({"name": name, "steps": [step]}, f"e2e '{name}'"),
                 data, cache / name, progress=False)
    print(f"  {name}: {ckpt}", flush=True)
    return load_detector(ckpt)


def _export(model, backend: str, out: Path, data: Path, threads: int, lowering=None):
    from edge_compress.export import export_model

    return export_model(model, backend, out, data=data, threads=threads, lowering=lowering)


def _runner(artifact, threads: int) -> Callable:
    from edge_compress.backends import get_backend

    return get_backend(artifact.backend).load(artifact.path, threads)


def end_to_end(data: Path, baseline_ckpt: Path, cache: Path, threads: int, quick: bool,
               timer: Callable, reps: tuple) -> list[dict]:
    from edge_compress.train.checkpoint import load_detector

    baseline = load_detector(baseline_ckpt).eval()
    tmp = Path(tempfile.mkdtemp(prefix="kernels_e2e_"))
    try:
        ref = _export(baseline, "onnxruntime", tmp / "ort_fp32", data, threads)
        spec_in = baseline.input_spec      # latency does not depend on the pixel values
        x = np.random.default_rng(0).standard_normal((1, 3, spec_in.height, spec_in.width), dtype=np.float32)
        rows = []
        for name, spec in RECIPES.items():
            model = _compressed(name, spec, baseline, data, cache, quick)
            art = _export(model, "kernels", tmp / name, data, threads, lowering=spec["lowering"])
            prec = art.manifest.get("precision") or {}
            lowered = sum(p != "fp32" for p in prec.values())
            ours, theirs = _runner(art, threads), _runner(ref, threads)
            s = timer({"ours": lambda: ours(x), "ort": lambda: theirs(x)}, *reps)
            med = {k: statistics.median(v) for k, v in s.items()}
            m, m_ref = art.manifest["metrics"]["map"], ref.manifest["metrics"]["map"]
            rows.append({"kind": f"e2e_{name}", "shape": f"yolo_tiny {x.shape[2]}px", "threads": threads,
                         "ours_ms": round(1e3 * med["ours"], 3), "ort_ms": round(1e3 * med["ort"], 3),
                         "ratio": round(med["ort"] / med["ours"], 3), "gmacs": 0.0,
                         "check": f"{lowered}/{len(prec)} convs {spec['lowering']['default']}",
                         "ap": round(m["ap"], 4), "ap50": round(m["ap50"], 4),
                         "ap_ort_fp32": round(m_ref["ap"], 4), "ap50_ort_fp32": round(m_ref["ap50"], 4),
                         "model_bytes": art.manifest["metrics"].get("model_bytes"),
                         "model_bytes_ort_fp32": ref.manifest["metrics"].get("model_bytes"),
                         "quick": quick})
            print(f"  e2e {name} @{threads}: ORT fp32 / kernels x{rows[-1]['ratio']:.2f}, "
                  f"AP {m['ap']:.3f} (fp32 ORT {m_ref['ap']:.3f})", flush=True)
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def e2e_inputs(quick: bool, tmp: Path) -> tuple[Path, Path, Path]:
    """(data, baseline checkpoint, cache folder) for the mode."""
    if quick:
        from backends import quick_checkpoints

        ckpts, data = quick_checkpoints(tmp)
        return data, ckpts["yolo_tiny"], tmp / "compressed"
    from backends import full_checkpoints

    ckpts, data = full_checkpoints(ROOT / "runs" / "bench_zoo", ["yolo_tiny"])
    return data, ckpts["yolo_tiny"], ROOT / "runs" / "bench_kernels"
