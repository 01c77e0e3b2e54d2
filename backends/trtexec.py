"""Parsers for what ``trtexec`` prints and writes on the device: its log (the performance
summary), ``--exportProfile`` (per-layer times) and ``--exportTimes`` (per-inference samples),
turned into our profile format. Pure text processing: no TensorRT needed to run them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from edge_compress.backends.base import LayerTiming
from edge_compress.errors import DataError


class TrtexecOutputError(DataError):
    """trtexec's log or JSON export holds no usable measurement; the message quotes why."""


def trt_layer_type(name: str) -> str:
    """A TensorRT layer's kind from its name: TensorRT names fused layers after the ONNX nodes they
    absorbed ("/backbone/conv1/Conv + /backbone/act1/Relu"), reformats and Myelin regions after
    themselves; "TensorRT" when the name says nothing more."""
    if name.startswith("Reformatting CopyNode"):
        return "Reformat"
    if name.startswith("PWN("):
        return "PointWise"
    if name.startswith(("{ForeignNode", "__myl", "__mye")):
        return "Myelin"
    op = re.sub(r"_\d+$", "", name.split(" + ")[0].split("/")[-1])
    return op if re.fullmatch(r"[A-Z][A-Za-z]+", op) else "TensorRT"


# --- what the device prints: trtexec's log, --exportProfile and --exportTimes ---------------------
#
# Formats, from trtexec's source (samples/common/sampleReporting.cpp) and real logs:
# - TensorRT 8.x/10.x print "=== Performance summary ===" with lines "Latency: min = a ms, max = b ms,
#   mean = c ms, median = d ms, percentile(99%) = e ms". Older 8.x (8.4 seen) print one percentile
#   (99% by default), recent releases (8.6, 10.x seen) percentile(90%), (95%) and (99%); 8.0-8.4 also
#   print "End-to-End Host Latency". A copied log whose line prefixes were lost still parses.
# - TensorRT 7.x (JetPack 4) print no summary header but blocks "Host Latency" / "Enqueue Time" /
#   "GPU Compute" of "min: a ms (end to end b ms)" ... "percentile: e ms at 99% (...)", "throughput:",
#   "walltime:" and "total compute time:" lines.
# Lines may carry "[date-time] [I] " prefixes (or none, when copied); they are stripped.

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan"
_PREFIX = re.compile(r"^\s*(?:\[[^\]]*\]\s*)*")
_STAT = re.compile(rf"\b(min|max|mean|median)\s*=?\s*({_NUM})\s*ms")
_PCT = re.compile(rf"percentile\((\d+(?:\.\d+)?)%\)\s*=?\s*({_NUM})\s*ms")
_SUMMARY_STATS = {"Latency": "latency", "GPU Compute Time": "gpu_compute", "Enqueue Time": "enqueue",
                  "H2D Latency": "h2d", "D2H Latency": "d2h", "End-to-End Host Latency": "end_to_end"}
_LEGACY_BLOCKS = {"Host Latency": "latency", "GPU Compute": "gpu_compute", "Enqueue Time": "enqueue",
                  "H2D Latency": "h2d", "D2H Latency": "d2h"}


@dataclass(frozen=True)
class TimingStats:
    """One metric of trtexec's summary, in ms; ``percentiles`` maps 90.0 -> its value (what was printed)."""

    min: float
    max: float
    median: float
    mean: float | None = None
    percentiles: dict[float, float] = field(default_factory=dict)

    def percentile(self, q: float) -> float | None:
        return self.percentiles.get(float(q))

    def to_dict(self) -> dict[str, float | None]:
        d = {"min": self.min, "max": self.max, "mean": self.mean, "p50": self.median}
        d.update({f"p{q:g}": self.percentile(q) for q in (90, 95, 99)})
        d.update({f"p{q:g}": v for q, v in sorted(self.percentiles.items()) if f"p{q:g}" not in d})
        return d


@dataclass(frozen=True)
class TrtexecReport:
    """trtexec's performance summary. ``latency`` is trtexec's "Latency" (H2D + GPU compute + D2H of
    one query; TensorRT 7's "Host Latency"); ``gpu_compute`` the kernels alone."""

    latency: TimingStats
    gpu_compute: TimingStats
    throughput_qps: float
    enqueue: TimingStats | None = None
    h2d: TimingStats | None = None
    d2h: TimingStats | None = None
    end_to_end: TimingStats | None = None
    host_walltime_s: float | None = None
    gpu_compute_total_s: float | None = None
    version: str | None = None
    device: str | None = None
    log_format: str = "summary"        # "summary" (TensorRT 8.x/10.x) | "legacy" (TensorRT 7.x)
    warnings: tuple[str, ...] = ()

    p50_ms = property(lambda self: self.latency.median)
    p90_ms = property(lambda self: self.latency.percentile(90))
    p95_ms = property(lambda self: self.latency.percentile(95))
    p99_ms = property(lambda self: self.latency.percentile(99))
    mean_ms = property(lambda self: self.latency.mean)
    min_ms = property(lambda self: self.latency.min)
    max_ms = property(lambda self: self.latency.max)

    def to_profile(self, times: "TrtexecTimes | None" = None) -> dict[str, Any]:
        """A JSON-ready record for a profile store; with ``times`` the raw per-query samples too."""
        stats = {f"{k}_ms": (None if s is None else s.to_dict()) for k, s in (
            ("latency", self.latency), ("gpu_compute", self.gpu_compute), ("enqueue", self.enqueue),
            ("h2d", self.h2d), ("d2h", self.d2h), ("end_to_end", self.end_to_end))}
        out = {"source": "trtexec", "runtime": "tensorrt", "runtime_version": self.version, "device": self.device,
               "log_format": self.log_format, **stats, "throughput_qps": self.throughput_qps,
               "total_host_walltime_s": self.host_walltime_s, "total_gpu_compute_s": self.gpu_compute_total_s,
               "warnings": list(self.warnings)}
        if times is not None:
            out["samples_ms"] = times.to_dict()
        return out


def parse_trtexec_log(text: str) -> TrtexecReport:
    """trtexec's console output (TensorRT 7.x to 10.x) -> its performance summary, version and device.
    A log without a summary (a failed build, --skipInference, or --dumpProfile without
    --separateProfileRun) raises ``TrtexecOutputError`` quoting the last error lines."""
    raw = text.splitlines()
    lines = [_PREFIX.sub("", line).rstrip() for line in raw]
    found = _summary(raw, lines)
    if found is None:
        found = _legacy_summary(lines)
    if found is None:
        raise TrtexecOutputError(_no_summary_reason(raw))
    return TrtexecReport(**found, version=_version(lines), device=_last_match(r"^Selected Device: (.+)$", lines))


def _summary(raw: list[str], lines: list[str]) -> dict[str, Any] | None:
    starts = [i for i, line in enumerate(lines) if line == "=== Performance summary ==="]
    if not starts:
        return None
    found: dict[str, Any] = {"log_format": "summary", "warnings": []}
    for rawline, line in zip(raw[starts[-1] + 1:], lines[starts[-1] + 1:]):
        if line.startswith(("===", "&&&&")):
            break   # "=== Explanations of the performance metrics ===" (--verbose) reuses the key names
        key, _, rest = line.partition(": ")
        if key in _SUMMARY_STATS:
            found[_SUMMARY_STATS[key]] = _stats(rest, line)
        elif key == "Throughput":
            found["throughput_qps"] = _number(rest, line)
        elif key == "Total Host Walltime":
            found["host_walltime_s"] = _number(rest, line)
        elif key == "Total GPU Compute Time":
            found["gpu_compute_total_s"] = _number(rest, line)
        elif "[W]" in rawline and line.strip():
            found["warnings"].append(line.strip())
    return _complete(found, "=== Performance summary ===")


def _legacy_summary(lines: list[str]) -> dict[str, Any] | None:
    """TensorRT 7.x: the last "Host Latency" block and the blocks after it."""
    starts = [i for i, line in enumerate(lines) if line == "Host Latency"]
    if not starts:
        return None
    found: dict[str, Any] = {"log_format": "legacy", "warnings": []}
    block, values = "latency", {}
    blocks: dict[str, dict[str, Any]] = {block: values}
    for line in lines[starts[-1] + 1:]:
        if line in _LEGACY_BLOCKS:
            block, values = _LEGACY_BLOCKS[line], {}
            blocks[block] = values
            continue
        key, sep, rest = line.partition(": ")
        if not sep or key not in ("min", "max", "mean", "median", "percentile", "throughput", "walltime",
                                  "total compute time"):
            break
        values[key] = rest
    for name, vals in blocks.items():
        found.update(_legacy_block(name, vals))
    return _complete(found, "Host Latency")


def _legacy_block(name: str, vals: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "throughput" in vals:
        out["throughput_qps"] = _number(vals["throughput"], vals["throughput"])
    if "walltime" in vals:
        out["host_walltime_s"] = _number(vals["walltime"], vals["walltime"])
    if "total compute time" in vals:
        out["gpu_compute_total_s"] = _number(vals["total compute time"], vals["total compute time"])
    if not {"min", "max", "median"} <= set(vals):
        return out
    first = {k: _number(v, v) for k, v in vals.items() if k in ("min", "max", "mean", "median")}
    pct = re.match(rf"({_NUM}) ms at (\d+(?:\.\d+)?)%", vals.get("percentile", ""))
    out[name] = TimingStats(first["min"], first["max"], first["median"], first.get("mean"),
                            {float(pct.group(2)): float(pct.group(1))} if pct else {})
    e2e = {k: re.search(rf"end to end ({_NUM}) ms", v) for k, v in vals.items()}
    if name == "latency" and all(e2e.get(k) for k in ("min", "max", "median")):
        pe = re.search(rf"end to end ({_NUM}) ms at (\d+(?:\.\d+)?)%", vals.get("percentile", ""))
        out["end_to_end"] = TimingStats(*(float(e2e[k].group(1)) for k in ("min", "max", "median")),
                                        float(e2e["mean"].group(1)) if e2e.get("mean") else None,
                                        {float(pe.group(2)): float(pe.group(1))} if pe else {})
    return out


def _complete(found: dict[str, Any], section: str) -> dict[str, Any]:
    missing = [k for k in ("latency", "gpu_compute", "throughput_qps") if k not in found]
    if missing:
        raise TrtexecOutputError(f"trtexec's '{section}' section lacks {missing}: the log is truncated or "
                                 "not trtexec's output")
    found["warnings"] = tuple(found["warnings"])
    return found


def _stats(rest: str, line: str) -> TimingStats:
    got = {k: float(v) for k, v in _STAT.findall(rest)}
    if not {"min", "max", "median"} <= set(got):
        raise TrtexecOutputError(f"cannot read min/max/median from trtexec's line '{line}'")
    return TimingStats(got["min"], got["max"], got["median"], got.get("mean"),
                       {float(q): float(v) for q, v in _PCT.findall(rest)})


def _number(rest: str, line: str) -> float:
    m = re.match(rf"\s*({_NUM})", rest)
    if not m:
        raise TrtexecOutputError(f"cannot read a number from trtexec's line '{line}'")
    return float(m.group(1))


def _last_match(pattern: str, lines: list[str]) -> str | None:
    hits = [m.group(1).strip() for m in (re.match(pattern, line) for line in lines) if m]
    return hits[-1] if hits else None


def _version(lines: list[str]) -> str | None:
    """"TensorRT version: 10.3.0" (8.x+), else the header's "[TensorRT v100300]" (major*10000 +
    minor*100 + patch from 10.0; major*1000 + minor*100 + patch before: v8502 is 8.5.2)."""
    printed = _last_match(r"^TensorRT version: (\S+)", lines)
    if printed:
        return printed
    code = _last_match(r".*\[TensorRT v(\d+)\]", lines)
    if code is None:
        return None   # TensorRT 7's header carries no version
    n = int(code)
    major, rest = (n // 10000, n % 10000) if n >= 100000 else (n // 1000, n % 1000)
    return f"{major}.{rest // 100}.{rest % 100}"


def _error_lines(raw: list[str]) -> list[str]:
    """Lines tagged [E] (or FAILED/ERROR) and the untagged continuation lines that follow them."""
    out, in_error = [], False
    for line in raw:
        if re.search(r"\[E\]|\bERROR\b|Error\[|&&&& FAILED", line):
            out.append(line.strip())
            in_error = True
        elif in_error and line.strip() and not re.match(r"\s*\[\d\d/\d\d/\d{4}-|&&&&", line):
            out.append(line.strip())   # e.g. "[8] Assertion failed: ..." under a parser error
        else:
            in_error = False
    return out


def _no_summary_reason(raw: list[str]) -> str:
    errors = _error_lines(raw)
    if any("e2e network timing is not reported" in line for line in raw):
        why = ("trtexec ran with --dumpProfile but without --separateProfileRun, so it printed no performance "
               "summary; run the trtexec_command from the artifact's manifest, which has both")
    elif any("&&&& FAILED" in line for line in raw) or errors:
        why = "trtexec failed before it timed anything: the log has no '=== Performance summary ==='"
    else:
        why = ("the log has no '=== Performance summary ===' (nor TensorRT 7's 'Host Latency' block): it is "
               "truncated, not trtexec's output, or trtexec ran with --skipInference/--buildOnly")
    return f"{why}. Last error lines:\n  " + "\n  ".join(errors[-8:]) if errors else f"{why}."


def _load_json(json_text: str, what: str) -> Any:
    try:
        return json.loads(json_text)
    except json.JSONDecodeError as e:
        raise TrtexecOutputError(f"trtexec's {what} is not valid JSON ({e}); it is truncated, or several runs "
                                 "were appended to one file: export each run to its own file") from e


def parse_trtexec_profile(json_text: str) -> list[LayerTiming]:
    """trtexec's --exportProfile JSON -> per-layer time in us, in execution order.

    The file is ``[{"count": N}, {"name", "timeMs", "averageMs", "medianMs", "percentage"}, ...]``
    (``medianMs`` since TensorRT 8.6; before it the median falls back to ``averageMs``). Layers with
    zero total time did not run (trtexec's own table skips them too) and are left out."""
    data = _load_json(json_text, "--exportProfile file")
    if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "count" not in data[0]:
        raise TrtexecOutputError("trtexec's --exportProfile JSON must be a list starting with {\"count\": N}")
    count = int(data[0]["count"])
    return [LayerTiming(d["name"], trt_layer_type(d["name"]), 1e3 * float(d.get("medianMs", d["averageMs"])), count)
            for d in data[1:] if float(d.get("timeMs", 0.0)) > 0.0]


@dataclass(frozen=True)
class TrtexecTimes:
    """The raw per-query samples of trtexec's --exportTimes JSON, in ms."""

    latency_ms: tuple[float, ...]
    compute_ms: tuple[float, ...]
    h2d_ms: tuple[float, ...]
    d2h_ms: tuple[float, ...]
    enqueue_ms: tuple[float, ...]
    end_to_end_ms: tuple[float, ...] | None = None   # TensorRT 7.x-8.4 only

    def __len__(self) -> int:
        return len(self.latency_ms)

    def to_dict(self) -> dict[str, list[float] | None]:
        return {"latency": list(self.latency_ms), "gpu_compute": list(self.compute_ms), "h2d": list(self.h2d_ms),
                "d2h": list(self.d2h_ms), "enqueue": list(self.enqueue_ms),
                "end_to_end": None if self.end_to_end_ms is None else list(self.end_to_end_ms)}


def parse_trtexec_times(json_text: str) -> TrtexecTimes:
    """trtexec's --exportTimes JSON (one dict per query) -> the raw samples. Key names changed over
    releases: TensorRT 8+ write ``h2dMs``/``d2hMs``, TensorRT 7 ``inMs``/``outMs``; both are read."""
    data = _load_json(json_text, "--exportTimes file")
    if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
        raise TrtexecOutputError("trtexec's --exportTimes JSON must be a non-empty list of per-query objects")

    def col(*keys: str) -> tuple[float, ...]:
        key = next((k for k in keys if k in data[0]), None)
        if key is None:
            raise TrtexecOutputError(f"trtexec's --exportTimes JSON has none of {list(keys)}; keys: {sorted(data[0])}")
        return tuple(float(d[key]) for d in data)

    e2e = col("endToEndMs") if "endToEndMs" in data[0] else None
    enqueue = tuple(float(d["endEnqMs"]) - float(d["startEnqMs"]) for d in data)
    return TrtexecTimes(col("latencyMs"), col("computeMs"), col("h2dMs", "inMs"), col("d2hMs", "outMs"), enqueue, e2e)
