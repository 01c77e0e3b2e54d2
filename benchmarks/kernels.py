"""Kernels benchmark: our numba conv kernels against ONNX Runtime on detector-sized convs, side by side.

    python benchmarks/kernels.py           # full: more shapes (strided 3x3 too), more repeats
    python benchmarks/kernels.py --quick   # < 2 min: the issue's headline shapes, fewer repeats

Every row times our kernel and ONNX Runtime's kernel for the same conv in the same run,
in alternating blocks (the order flips every block so machine drift hits both alike), after
a warm-up, at 1 and then 2 threads (``numba.set_num_threads`` and ORT's
``intra_op_num_threads``); the figure is the ratio of medians, ORT / ours (> 1: ours faster).

- binary: ``binary_conv2d`` (packed signs, XNOR-popcount, +1 padding) vs ORT's fp32 ``Conv``
  of the same shape (goal >= 10x). The packing of the activation is not timed (a binary
  network packs once per layer output, inside the previous layer's epilogue).
- sparse: ``sparse_conv2d_csr`` at 90% unstructured sparsity and ``sparse_conv2d_nm`` at 2:4
  on 1x1 convs vs ORT's dense fp32 ``Conv`` (goal >= 3x at 90%).
- int8: ``conv2d_int8`` with requantisation (weights packed once by ``pack_conv_weights``, as
  ORT packs its weights at session creation) vs ORT's ``QLinearConv`` (uint8 activations with a
  zero point, int8 symmetric per-channel weights, int32 bias: the operator ORT fuses a
  ``quantize_static`` QDQ Conv into) with the same scales (goal >= 0.5x).

Outputs are cross-checked once per row (binary and sparse against ORT's fp32 result, int8
within 1 LSB of QLinearConv, whose float requantisation rounds differently). Binary MACs per
cycle: achieved binary MACs/s at 1 thread over the popcount limit of this CPU, see
``popcount_limit``. Ends with one ``RESULT {json}`` line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numba
import numpy as np
import onnxruntime as ort
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from onnx import TensorProto, helper, numpy_helper

from edge_compress.kernels.binary import binary_conv2d, pack_bits
from edge_compress.kernels.int8 import conv2d_int8, pack_conv_weights, quantize_multiplier

GOALS = {"binary": 10.0, "sparse90": 3.0, "int8": 0.5}
FLAGS = ("popcnt", "avx2", "avx512f", "avx512_vpopcntdq", "avx512_bitalg", "avx512_vnni", "avx_vnni", "amx_int8")


@dataclass(frozen=True)
class Shape:
    """A conv: (1, c, h, h) -> oc channels, k x k kernel, stride s, padding k // 2, groups g."""

    c: int
    h: int
    oc: int
    k: int = 3
    s: int = 1
    g: int = 1

    @property
    def name(self) -> str:
        dw = f" g{self.g}" if self.g > 1 else ""
        return f"{self.c}x{self.h}x{self.h}->{self.oc} k{self.k}s{self.s}{dw}"

    @property
    def out_hw(self) -> int:
        return (self.h + 2 * (self.k // 2) - self.k) // self.s + 1

    @property
    def macs(self) -> int:
        return self.c // self.g * self.oc * self.k * self.k * self.out_hw ** 2


QUICK = {
    "binary": [Shape(128, 40, 128), Shape(256, 20, 256), Shape(64, 80, 64)],
    "sparse": [Shape(128, 40, 128, 1), Shape(256, 20, 256, 1)],
    "int8": [Shape(128, 40, 128), Shape(256, 20, 256), Shape(64, 80, 64), Shape(128, 40, 128, g=128),
             Shape(256, 20, 256, 1)],
}
FULL = {
    "binary": QUICK["binary"] + [Shape(128, 40, 256, s=2), Shape(256, 20, 512, s=2), Shape(512, 10, 512)],
    "sparse": QUICK["sparse"] + [Shape(64, 80, 64, 1), Shape(512, 10, 512, 1), Shape(128, 40, 256, 1)],
    "int8": QUICK["int8"] + [Shape(128, 40, 256, s=2), Shape(512, 10, 512), Shape(64, 80, 64, g=64),
                             Shape(256, 20, 256, s=2, g=256), Shape(64, 80, 128, 1)],
}


# --------------------------------------------------------------------------- machine


def cpu_info() -> dict:
    """Model name, nominal MHz and the SIMD flags that decide which kernels run (from /proc/cpuinfo)."""
    info = {"model": platform.processor() or platform.machine(), "mhz": None, "flags": []}
    path = Path("/proc/cpuinfo")
    for line in path.read_text().splitlines() if path.exists() else []:
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key == "model name":
            info["model"] = val
        elif key == "cpu MHz" and info["mhz"] is None:
            info["mhz"] = float(val)
        elif key == "flags" and not info["flags"]:
            have = set(val.split())
            info["flags"] = [f for f in FLAGS if f in have]
    info["logical_cpus"] = numba.config.NUMBA_DEFAULT_NUM_THREADS
    return info


@numba.njit(cache=True)
def _square_chain(n, x):
    """n dependent 64-bit multiplies (x = x * x): LLVM cannot shorten a squaring chain."""
    for _ in range(n):
        x = x * x
    return x


_CHAINS = 12  # independent popcount chains: > latency (3 cycles) x throughput (<= 2 per cycle)


@intrinsic
def _ctpop_chains(typingctx, n, seed):
    """n rounds of v_i = ctpop(v_i) on 12 independent <8 x i64> registers (one VPOPCNTQ zmm each
    on AVX-512 VPOPCNTDQ), no loads, no other work; returns a sum so nothing is dead code."""
    def codegen(context, builder, signature, args):
        vty = ir.VectorType(ir.IntType(64), 8)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vty, [vty]), "llvm.ctpop.v8i64")
        base = builder.insert_element(ir.Constant(vty, ir.Undefined), args[1], ir.Constant(ir.IntType(32), 0))
        base = builder.shuffle_vector(base, ir.Constant(vty, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), 8), [0] * 8))
        regs = [cgutils.alloca_once_value(builder, builder.add(base, ir.Constant(vty, [c * 8 + j for j in range(8)])))
                for c in range(_CHAINS)]
        with cgutils.for_range(builder, args[0]):
            for r in regs:
                builder.store(builder.call(fn, [builder.load(r)]), r)
        total = builder.load(regs[0])
        for r in regs[1:]:
            total = builder.add(total, builder.load(r))
        return builder.extract_element(total, ir.Constant(ir.IntType(32), 0))
    return types.int64(types.intp, types.int64), codegen


@numba.njit(cache=True)
def _popcount_rounds(n, seed):
    return _ctpop_chains(n, seed)


def popcount_limit(flags: list[str]) -> tuple[int, str]:
    """Popcounted bits per cycle per core by the book: 512 with AVX-512 VPOPCNTDQ (one VPOPCNTQ
    zmm per cycle: port 5 on Ice Lake / Golden Cove cores), else 64 (one POPCNT r64 per cycle)."""
    if "avx512_vpopcntdq" in flags:
        return 512, "1 VPOPCNTQ zmm (512 bit) per cycle"
    return 64, "1 POPCNT r64 per cycle"


# --------------------------------------------------------------------------- ONNX Runtime models


def ort_session(graph, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def fp32_conv_graph(sh: Shape, w: np.ndarray):
    node = helper.make_node("Conv", ["x", "w"], ["y"], pads=[sh.k // 2] * 4, strides=[sh.s] * 2, group=sh.g)
    return helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, sh.c, sh.h, sh.h])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])


def qlinear_conv_graph(sh: Shape, q: dict):
    names = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"]
    inits = [numpy_helper.from_array(q[n], n) for n in names[1:]]
    node = helper.make_node("QLinearConv", names, ["y"], pads=[sh.k // 2] * 4, strides=[sh.s] * 2, group=sh.g)
    return helper.make_graph([node], "qconv", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, sh.c, sh.h, sh.h])],
                             [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)


# --------------------------------------------------------------------------- timing


def timed_alternating(fns: dict[str, Callable[[], object]], warmup: int, blocks: int, per_block: int) -> dict[str, list]:
    """Seconds per call of each contender: warm-up, then ``blocks`` blocks of ``per_block`` calls
    each, contenders alternating block by block (order reversed every other block)."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    samples: dict[str, list] = {n: [] for n in names}
    for b in range(blocks):
        for name in names if b % 2 == 0 else names[::-1]:
            for _ in range(per_block):
                t = time.perf_counter()
                fns[name]()
                samples[name].append(time.perf_counter() - t)
    return samples


_POPCNT_ROUNDS, _IMUL_CHAIN = 20_000, 100_000  # ~0.1 ms each


def machine_probes() -> dict[str, Callable[[], object]]:
    """The popcount-limit and clock probes, timed in the same alternating blocks as a binary row
    so that all three see the same state of this shared machine."""
    _popcount_rounds(10, 1)
    _square_chain(10, np.uint64(3))
    return {"popcnt": lambda: _popcount_rounds(_POPCNT_ROUNDS, 1),
            "imul": lambda: _square_chain(_IMUL_CHAIN, np.uint64(3))}


def measure(kind: str, sh: Shape, ours: Callable, theirs: Callable, threads: int, reps: tuple) -> dict:
    probes = machine_probes() if kind == "binary" and threads == 1 else {}
    s = timed_alternating({"ours": ours, "ort": theirs, **probes}, *reps)
    med = {k: statistics.median(v) for k, v in s.items()}
    row = {"kind": kind, "shape": sh.name, "threads": threads, "ours_ms": round(1e3 * med["ours"], 4),
           "ort_ms": round(1e3 * med["ort"], 4), "ratio": round(med["ort"] / med["ours"], 3),
           "gmacs": round(sh.macs / med["ours"] / 1e9, 1), "macs": sh.macs}
    if probes:
        row["popcount_limit_bits_per_s"] = _CHAINS * _POPCNT_ROUNDS * 512 / med["popcnt"]
        row["clock_hz"] = 3 * _IMUL_CHAIN / med["imul"]
    return row


# --------------------------------------------------------------------------- contenders


def binary_pair(sh: Shape, rng, threads: int):
    x = rng.standard_normal((1, sh.c, sh.h, sh.h)).astype(np.float32)
    w = rng.standard_normal((sh.oc, sh.c, sh.k, sh.k)).astype(np.float32)
    xb, wb = pack_bits(x), pack_bits(w)
    sess = ort_session(fp32_conv_graph(sh, np.where(w >= 0, 1, -1).astype(np.float32)), threads)
    xs = {"x": np.where(x >= 0, 1, -1).astype(np.float32)}
    ours = lambda: binary_conv2d(xb, wb, sh.c, stride=sh.s, padding=sh.k // 2)  # noqa: E731
    theirs = lambda: sess.run(None, xs)  # noqa: E731
    p = sh.k // 2  # ORT pads with 0, we pad with +1: compare the outputs whose window lies inside
    inner = slice(-(-p // sh.s), (sh.h - sh.k + p) // sh.s + 1)
    ok = np.array_equal(ours()[..., inner, inner], theirs()[0][..., inner, inner].astype(np.int32))
    return ours, theirs, "exact (interior)" if ok else "MISMATCH"


def sparse_pair(sh: Shape, rng, threads: int, fmt: str):
    from edge_compress.kernels import sparse

    # the activation on a cache-line boundary, as the layer before (our kernels, ORT) leaves it;
    # NumPy's own 16-byte alignment made our side of these rows vary by a third from run to run
    x = sparse.aligned_empty((1, sh.c, sh.h, sh.h))
    x[:] = rng.standard_normal(x.shape)
    w = rng.standard_normal((sh.oc, sh.c, sh.k, sh.k)).astype(np.float32)
    w2 = w.reshape(sh.oc, -1)
    if fmt == "csr":
        w2[rng.random(w2.shape) < 0.9] = 0.0
        packed = sparse.csr_pack(w2)
        ours = lambda: sparse.sparse_conv2d_csr(x, packed, sh.k, sh.k, sh.c, sh.s, sh.k // 2, 1, None)  # noqa: E731
    else:
        groups = w2.reshape(sh.oc, -1, 4)
        drop = np.argsort(rng.random(groups.shape), axis=-1)[..., :2]
        np.put_along_axis(groups, drop, 0.0, axis=-1)
        packed = sparse.nm_pack(w2, 2, 4)
        ours = lambda: sparse.sparse_conv2d_nm(x, packed, sh.k, sh.k, sh.c, sh.s, sh.k // 2, 1, None)  # noqa: E731
    sess = ort_session(fp32_conv_graph(sh, w2.reshape(w.shape)), threads)
    theirs = lambda: sess.run(None, {"x": x})  # noqa: E731
    err = float(np.abs(ours() - theirs()[0]).max())
    return ours, theirs, f"max |diff| {err:.1e}" if err < 1e-3 else f"MISMATCH {err:.1e}"


def int8_pair(sh: Shape, rng, threads: int):
    icg = sh.c // sh.g
    w = rng.integers(-127, 128, (sh.oc, icg, sh.k, sh.k)).astype(np.int8)
    ws = rng.uniform(0.002, 0.02, sh.oc).astype(np.float32)
    q = {"xs": np.float32(0.02), "xz": np.uint8(121), "w": w, "ws": ws, "wz": np.zeros(sh.oc, np.int8),
         "ys": np.float32(0.05 * math.sqrt(icg * sh.k * sh.k)), "yz": np.uint8(118),
         "b": rng.integers(-2000, 2000, sh.oc).astype(np.int32)}
    q = {k: np.asarray(v) for k, v in q.items()}
    x = rng.integers(0, 256, (1, sh.c, sh.h, sh.h)).astype(np.uint8)
    mult, shift = quantize_multiplier(q["xs"].astype(np.float64) * ws.astype(np.float64) / np.float64(q["ys"]))
    sess = ort_session(qlinear_conv_graph(sh, q), threads)
    wp = pack_conv_weights(w, sh.g)  # packed once, as ORT packs its weights at session creation
    ours = lambda: conv2d_int8(x, wp, q["b"], int(q["xz"]), 0, stride=sh.s, padding=sh.k // 2, groups=sh.g,  # noqa: E731
                               multiplier=mult, shift=shift, out_zp=int(q["yz"]), out_dtype=np.uint8)
    theirs = lambda: sess.run(None, {"x": x})  # noqa: E731
    diff = int(np.abs(ours().astype(np.int16) - theirs()[0].astype(np.int16)).max())
    return ours, theirs, f"max |diff| {diff} LSB" if diff <= 1 else f"MISMATCH {diff} LSB"


def end_to_end_rows(args, threads: int, reps: tuple) -> list[dict]:
    """Compressed yolo_tiny detectors (binary backbone, 80% sparse) lowered to our kernels against the
    uncompressed detector at fp32 on ONNX Runtime, with mAP; see benchmarks/kernels_e2e.py."""
    if args.no_e2e:
        return []
    import tempfile

    from kernels_e2e import e2e_inputs, end_to_end

    with tempfile.TemporaryDirectory(prefix="kernels_e2e_data_") as tmp:
        data, baseline, cache = e2e_inputs(args.quick, Path(tmp))
        return end_to_end(data, baseline, cache, threads, args.quick, timed_alternating, reps)


# --------------------------------------------------------------------------- report


def binary_fraction(rows: list[dict], cpu: dict) -> dict | None:
    """Best 1-thread binary MACs/s over the popcount limit measured in the same blocks (the
    headline ``value``), and over the by-the-book limit (bits/cycle x calibrated or nominal clock)."""
    best = max((r for r in rows if r["kind"] == "binary" and r["threads"] == 1 and "ratio" in r),
               key=lambda r: r["gmacs"], default=None)
    if best is None:
        return None
    macs, limit, clock = best["gmacs"] * 1e9, best["popcount_limit_bits_per_s"], best["clock_hz"]
    bits, why = popcount_limit(cpu["flags"])
    return {"value": round(macs / limit, 3), "shape": best["shape"], "binary_macs_per_s": macs,
            "measured_limit_bits_per_s": round(limit), "measured_limit_bits_per_cycle": round(limit / clock, 1),
            "limit_method": f"{_CHAINS} independent llvm.ctpop.v8i64 chains in registers (VPOPCNTQ zmm), 512 bits "
                            "per op, median timed in the same alternating blocks as the kernel",
            "book_limit_bits_per_cycle": bits, "book_limit": why, "clock_hz": round(clock),
            "clock_method": "dependent 64-bit IMUL chain, 3 cycles each, same blocks",
            "value_book_calibrated_clock": round(macs / (bits * clock), 3),
            "value_book_nominal_clock": round(macs / (bits * cpu["mhz"] * 1e6), 3) if cpu["mhz"] else None,
            "note": "1 thread; the kernel issues XOR + VPOPCNTQ + VPADDQ per 512 bits, 3 vector uops on the "
                    "2 AVX-512 ports, so it cannot exceed ~2/3 of a 1-per-cycle popcount limit"}


def threading_info() -> dict:
    """numba's threading layer and the OpenMP wait policy: OMP_WAIT_POLICY=PASSIVE puts idle OpenMP
    workers to sleep, and waking them costs more than a sub-millisecond kernel's parallel region
    (measured: binary conv 0.29 ms at 2 threads with PASSIVE, 0.16 ms without)."""
    return {"numba_layer": numba.threading_layer(), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}


def summary(rows: list[dict], kind: str, threads: int) -> dict:
    sel = [r for r in rows if r["kind"] == kind and r["threads"] == threads and "ratio" in r]
    if not sel:
        why = next((r["note"] for r in rows if r["kind"] == kind and "note" in r), f"no rows at {threads} thread(s)")
        return {"available": False, "reason": why}
    ratios = [r["ratio"] for r in sel]
    return {"per_shape": {r["shape"]: r["ratio"] for r in sel},
            "geomean": round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 3), "min": min(ratios)}


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    hdr = f"{'kind':<9} {'shape':<26} {'thr':>3} {'ours ms':>9} {'ORT ms':>9} {'ORT/ours':>9} {'GMAC/s':>8}  check"
    print(hdr + "\n" + "-" * (len(hdr) + 12))
    for r in rows:
        if "ratio" not in r:
            print(f"{r['kind']:<9} {r['shape']:<26} {r['threads']:>3} {'':>9} {'':>9} {'':>9} {'':>8}  {r['note']}")
            continue
        print(f"{r['kind']:<9} {r['shape']:<26} {r['threads']:>3} {r['ours_ms']:>9.3f} {r['ort_ms']:>9.3f} "
              f"{'x%.2f' % r['ratio']:>9} {r['gmacs']:>8.1f}  {r['check']}")


KINDS = {"binary": "binary", "sparse90": "sparse", "sparse24": "sparse", "int8": "int8"}  # kind -> shape list


def run_rows(shapes: dict, kinds: list[str], threads: int, reps: tuple, rng) -> list[dict]:
    numba.set_num_threads(threads)
    makers = {"binary": lambda sh: binary_pair(sh, rng, threads), "int8": lambda sh: int8_pair(sh, rng, threads),
              "sparse90": lambda sh: sparse_pair(sh, rng, threads, "csr"),
              "sparse24": lambda sh: sparse_pair(sh, rng, threads, "nm")}
    rows = []
    plan = [(kind, sh, makers[kind]) for kind in kinds for sh in shapes[KINDS[kind]]]
    for kind, sh, make in plan:
        try:
            ours, theirs, check = make(sh)
        except ImportError as e:  # kernels.sparse not there (yet)
            rows.append({"kind": kind, "shape": sh.name, "threads": threads, "note": f"not available ({e})"})
            continue
        row = measure(kind, sh, ours, theirs, threads, reps)
        row["check"] = check
        rows.append(row)
        print(f"  {kind} {sh.name} @{threads}: ORT/ours x{row['ratio']:.2f} ({check})", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="headline shapes only, fewer repeats (< 2 min)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS), help="default: all")
    ap.add_argument("--no-e2e", action="store_true", help="skip the end-to-end detector rows")
    args = ap.parse_args(argv)
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" and max(args.threads) > 1:
        print("WARNING: OMP_WAIT_POLICY=PASSIVE: numba's OpenMP workers sleep between parallel regions and "
              "waking them dominates sub-millisecond kernels; the multi-thread rows will understate our kernels")
    shapes = QUICK if args.quick else FULL
    reps = (5, 6, 10) if args.quick else (10, 10, 20)  # warm-up, blocks, calls per block
    cpu = cpu_info()
    rng = np.random.default_rng(0)
    rows = []
    for threads in args.threads:
        rows += run_rows(shapes, args.kinds, threads, reps, rng)
        if threads == 1:          # detectors at 1 thread: the comparison point
            rows += end_to_end_rows(args, threads, reps)
    numba.set_num_threads(1)
    frac = binary_fraction(rows, cpu)
    label = " (QUICK)" if args.quick else ""
    print_table(rows, f"kernels benchmark{label}: {cpu['model']}, flags {' '.join(cpu['flags'])}; "
                      f"warm-up {reps[0]}, {reps[1]} alternating blocks of {reps[2]} calls, medians")
    for r in rows:
        if r["kind"].startswith("e2e_"):
            print(f"{r['kind']}: mAP through the runtime AP {r['ap']:.3f} / AP50 {r['ap50']:.3f} vs the uncompressed "
                  f"detector on ORT fp32 AP {r['ap_ort_fp32']:.3f} / AP50 {r['ap50_ort_fp32']:.3f}; {r['check']}"
                  + (" (QUICK: no fine-tune, mAP not meaningful)" if r["quick"] else ""))
    if 2 in args.threads:
        print("2-thread rows: on a 2-vCPU machine shared with other jobs a parallel region waits for whichever "
              "worker is descheduled, so those medians measure the machine's load as much as the kernels")
    if frac:
        print(f"binary MACs: {frac['binary_macs_per_s'] / 1e9:.0f} G/s at 1 thread ({frac['shape']}) = "
              f"{frac['value']:.2f} of the measured popcount limit ({frac['measured_limit_bits_per_s'] / 1e9:.0f} "
              f"Gbit/s = {frac['measured_limit_bits_per_cycle']:.0f} bits/cycle at the calibrated "
              f"{frac['clock_hz'] / 1e9:.2f} GHz; by the book {frac['book_limit_bits_per_cycle']} bits/cycle: "
              f"{frac['value_book_calibrated_clock']:.2f} at that clock, {frac['value_book_nominal_clock']:.2f} "
              f"at the nominal {cpu['mhz']:.0f} MHz)")
    print("goals (1 thread): " + ", ".join(f"{k} >= {v}x" for k, v in GOALS.items()))
    result = {"quick": args.quick, "cpu": cpu, "threads": args.threads, "threading": threading_info(),
              "binary_vs_ort_fp32": summary(rows, "binary", 1), "sparse90_vs_ort_fp32": summary(rows, "sparse90", 1),
              "sparse_2_4_vs_ort_fp32": summary(rows, "sparse24", 1), "int8_vs_ort_int8": summary(rows, "int8", 1),
              "binary_macs_per_cycle_fraction": frac, "goals": GOALS,
              "two_threads": {k: summary(rows, k, 2) for k in ("binary", "sparse90", "sparse24", "int8")}
              if 2 in args.threads else None,
              "end_to_end": {r["kind"][4:]: {k: r[k] for k in ("ours_ms", "ort_ms", "ratio", "ap", "ap50", "ap_ort_fp32",
                                                               "ap50_ort_fp32", "check", "shape")}
                             for r in rows if r["kind"].startswith("e2e_")},
              "rows": rows,
              "versions": {"onnxruntime": ort.__version__, "numba": numba.__version__, "numpy": np.__version__}}
    print("RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
