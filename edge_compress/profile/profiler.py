"""Profile an artifact on this machine: latency end to end and per layer, memory, energy, environment.

``profile_artifact(path, ProfileSettings())`` returns one JSON-able record
(DESIGN.md "Profile"). Every section says how its numbers were obtained
(``method``: measured or estimated; repeats and warm-up), so two records can
be compared honestly.

How latency is measured, and why:

* input: a fixed seeded uniform tensor (``uniform[0,1)``, seed 0) of the
  artifact's input shape, batch 1, already in the network's input space. The
  dense detectors here run the same instructions whatever the pixel values,
  and letterbox/normalise is host-side preprocessing, not the model's latency;
* warm-up runs first (first runs allocate, compile and fill caches); they are
  kept in the record but not in the statistics;
* then repeats until the median is stable: the distribution-free 95%
  confidence interval of the median (order statistics; its ranks come from
  the Binomial(n, 1/2) distribution, so no normality is assumed) has a
  half-width below ``target_rel_ci`` of the median, or a cap
  (``max_repeats``, ``max_seconds``) is hit. The record says which;
* the timer is ``time.perf_counter_ns`` around one ``runner(x)`` call (input
  copy in, inference, output copy out), with Python's garbage collector off;
* per-layer times come from the runtime's own profiler in a separate run, so
  the profiler's overhead never enters the end-to-end figures.

Device side: imports neither torch nor the compression code.
"""

from __future__ import annotations

import gc
import glob
import hashlib
import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_compress.artifact import MANIFEST, Artifact, load_artifact, sha256_file
from edge_compress.backends import get_backend
from edge_compress.errors import BackendUnavailableError, ConfigError, EdgeCompressError, require_known_keys
from edge_compress.profile.devices import ENERGY_SENSORS, DeviceConfig
from edge_compress.profile.energy import Sensor, detect_sensors, estimate_energy, measure_with_idle

SCHEMA_VERSION = 1
ENERGY_CHOICES = ("auto", *ENERGY_SENSORS)
CONFIDENCE = 0.95
INPUT_SEED = 0
# A sensor that is not there on this board, and what to read instead (said in the record).
SENSOR_FALLBACKS = {"ina3221": "tegrastats"}


@dataclass(frozen=True)
class ProfileSettings:
    """How to profile: warm-up, the stopping rule, threads, per-layer and energy."""

    warmup: int = 10
    warmup_seconds: float = 0.0   # and warm up for at least this long (a CPU idle a while runs slow at first)
    min_repeats: int = 20
    max_repeats: int = 1000
    max_seconds: float = 30.0
    target_rel_ci: float = 0.01   # stop once the 95% CI half-width of the median is < 1% of it
    threads: int = 1
    per_layer: bool = True
    energy: str = "auto"          # "auto", a sensor name, "estimate", or "none"
    energy_idle_s: float = 2.0    # measured sensors: idle window before the workload window
    energy_window_s: float = 3.0  # measured sensors: how long the workload window runs

    def __post_init__(self) -> None:
        kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, kinds[f.type]) or (isinstance(v, bool) and f.type != "bool"):
                raise ConfigError(f"ProfileSettings.{f.name}={v!r} ({type(v).__name__}): expected {f.type}")
        self._check_ranges()

    def _check_ranges(self) -> None:
        if self.warmup < 0 or self.threads < 1 or self.warmup_seconds < 0:
            raise ConfigError(f"ProfileSettings: warmup={self.warmup} and warmup_seconds={self.warmup_seconds} must "
                              f"be >= 0 and threads={self.threads} >= 1")
        if not 1 <= self.min_repeats <= self.max_repeats:
            raise ConfigError(f"ProfileSettings: need 1 <= min_repeats ({self.min_repeats}) <= max_repeats "
                              f"({self.max_repeats}); raise --max-repeats or lower min_repeats")
        positive = (self.max_seconds, self.target_rel_ci, self.energy_idle_s, self.energy_window_s)
        if not all(v > 0 for v in positive):
            raise ConfigError("ProfileSettings: max_seconds, target_rel_ci, energy_idle_s and energy_window_s must be "
                              f"positive (got {self.max_seconds}, {self.target_rel_ci}, {self.energy_idle_s}, "
                              f"{self.energy_window_s})")
        if self.energy not in ENERGY_CHOICES:
            raise ConfigError(f"ProfileSettings.energy={self.energy!r}; choose one of: {', '.join(ENERGY_CHOICES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProfileSettings":
        require_known_keys(cls, d, source="profile settings")
        return cls(**d)

    def digest(self) -> str:
        """sha256 of the settings' canonical JSON: the key a store files a record under."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


# --- the stopping rule -------------------------------------------------------------------------

@lru_cache(maxsize=4096)
def median_ci_ranks(n: int, confidence: float = CONFIDENCE) -> tuple[int, int] | None:
    """1-based ranks ``(l, u)`` with ``P(x_(l) <= median <= x_(u)) >= confidence`` for any continuous
    distribution, or ``None`` when ``n`` is too small for one (n < 6 at 95%).

    The number of samples below the true median is Binomial(n, 1/2), so the
    interval ``[x_(l), x_(n+1-l)]`` misses it with probability ``2 * P(B <= l-1)``
    (e.g. Conover, Practical Nonparametric Statistics, 3rd ed., section 3.2).
    ``l`` is the largest rank keeping that below ``1 - confidence``.
    """
    alpha_half = (1.0 - confidence) / 2.0
    log_half_n = n * math.log(0.5)
    cdf, l = 0.0, 0
    for i in range(n // 2 + 1):
        cdf += math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half_n)
        if cdf > alpha_half:
            break
        l = i + 1
    return (l, n + 1 - l) if l >= 1 else None


def median_ci(samples: list[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """The distribution-free confidence interval of the median of ``samples``."""
    ranks = median_ci_ranks(len(samples), confidence)
    if ranks is None:
        return None
    s = sorted(samples)
    return s[ranks[0] - 1], s[ranks[1] - 1]


def _converged(samples: list[float], target: float) -> tuple[bool, float | None]:
    ci = median_ci(samples)
    if ci is None:
        return False, None
    rel = (ci[1] - ci[0]) / 2.0 / statistics.median(samples)
    return rel < target, rel


def time_runs(run: Callable[[], object], settings: ProfileSettings,
              runtime_timer: tuple[Callable[[], float], str] | None = None) -> dict[str, Any]:
    """Warm up, then time ``run()`` until the median is stable or a cap is hit.

    ``runtime_timer`` (a reader of the runtime's own latency of the last call,
    and what it is) adds those figures beside ours, read after each timed call.
    """
    t_warm = time.perf_counter()
    warm = [_time_once(run) for _ in range(settings.warmup)]
    while time.perf_counter() - t_warm < settings.warmup_seconds:
        warm.append(_time_once(run))
    samples: list[float] = []
    own: list[float] = []
    next_check, rel, stopped = settings.min_repeats, None, None
    gc_was_on = gc.isenabled()
    gc.disable()  # a collection inside a timed call is the collector's time, not the model's
    t_start = time.perf_counter()
    try:
        while stopped is None:
            samples.append(_time_once(run))
            if runtime_timer is not None:
                own.append(runtime_timer[0]())
            n = len(samples)
            if n >= next_check:
                done, rel = _converged(samples, settings.target_rel_ci)
                stopped = "converged" if done else None
                next_check = n + max(1, n // 50)   # re-sort every ~2% more samples, not every sample
            if stopped is None and n >= settings.max_repeats:
                stopped = "max_repeats"
            elif stopped is None and time.perf_counter() - t_start >= settings.max_seconds:
                stopped = "max_seconds"
    finally:
        if gc_was_on:
            gc.enable()
    stats = latency_stats(samples, warm, stopped, time.perf_counter() - t_start, settings)
    if runtime_timer is not None:
        stats["runtime_reported"] = runtime_reported(samples, own, runtime_timer[1])
    return stats


def _time_once(run: Callable[[], object]) -> float:
    t0 = time.perf_counter_ns()
    run()
    return (time.perf_counter_ns() - t0) / 1e6


def latency_stats(samples: list[float], warm: list[float], stopped: str, wall_s: float,
                  settings: ProfileSettings) -> dict[str, Any]:
    """Percentiles (linear interpolation), mean, std and the median's CI of ``samples`` in ms."""
    a = np.asarray(samples)
    ci = median_ci(samples)
    p50 = float(np.median(a))
    why = {"converged": f"the 95% CI half-width of the median fell below {settings.target_rel_ci:.1%} of it",
           "max_repeats": f"max_repeats={settings.max_repeats} reached before the median was stable",
           "max_seconds": f"max_seconds={settings.max_seconds:g} reached before the median was stable"}[stopped]
    return {
        "method": "measured", "unit": "ms", "batch": 1,
        "timer": "time.perf_counter_ns around one runner(x) call (input copy, inference, output copy); gc off",
        "warmup": len(warm), "repeats": len(samples), "stopped": stopped, "stop_reason": why,
        "wall_s": round(wall_s, 3),
        "p50": p50, "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()), "max": float(a.max()),
        "median_ci95": list(ci) if ci else None,
        "median_ci95_rel_halfwidth": (ci[1] - ci[0]) / 2 / p50 if ci else None,
        "ci_method": "distribution-free: order statistics with Binomial(n, 1/2) ranks",
        "percentile_method": "numpy linear interpolation",
        "samples_ms": [round(s, 6) for s in samples],
        "warmup_ms": [round(s, 6) for s in warm],
    }


def runtime_reported(samples: list[float], own: list[float], what: str) -> dict[str, Any]:
    """The runtime's own per-call latency of the same timed calls, and what our timer adds on top of it."""
    a = np.asarray(own)
    overhead = np.asarray(samples) - a
    return {
        "method": "measured by the runtime", "source": what, "unit": "ms",
        "p50": float(np.median(a)), "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()), "host_overhead_p50_ms": float(np.median(overhead)),
        "note": "the same calls as samples_ms; host overhead = our timer minus the runtime's (the Python call, "
                "input and output copies)",
        "samples_ms": [round(float(v), 6) for v in a],
    }


def runtime_timer(runner: object) -> tuple[Callable[[], float], str] | None:
    """A reader of the runtime's own latency of the last call, where the runtime keeps one (OpenVINO)."""
    request = getattr(runner, "request", None)
    if request is None or not hasattr(request, "latency"):
        return None
    return (lambda: float(request.latency)), "OpenVINO InferRequest.latency: the plugin's infer() call, in ms"


# --- input, per layer, memory ------------------------------------------------------------------

def make_input(spec: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The fixed input every profile uses, and how it was made."""
    shape = (1, int(spec.get("channels", 3)), int(spec["height"]), int(spec["width"]))
    x = np.random.default_rng(INPUT_SEED).random(shape, dtype=np.float32)
    return x, {"kind": f"uniform[0,1) float32, seed {INPUT_SEED}", "shape": list(shape),
               "note": "a fixed seeded tensor in the network's input space (no letterbox/normalise in the timed "
                       "call); these dense models run the same work whatever the pixel values"}


def per_layer(art: Artifact, x: np.ndarray, settings: ProfileSettings) -> dict[str, Any]:
    """Per-node times from the runtime's profiler, in a run separate from the end-to-end one."""
    if not settings.per_layer:
        return {"method": "not run", "reason": "per_layer=False (--no-per-layer)"}
    repeats, warmup = settings.min_repeats, min(settings.warmup, 10)
    try:
        layers = get_backend(art.backend).profile_layers(art.path, x, repeats=repeats, warmup=warmup,
                                                         threads=settings.threads)
    except (BackendUnavailableError, NotImplementedError, AttributeError) as e:
        return {"method": "unavailable", "reason": f"{art.backend} gives no per-layer times here: {e}"}
    return {
        "method": "measured", "source": f"{art.backend}'s own profiler", "unit": "us",
        "separate_run": True, "warmup": warmup, "repeats": repeats,
        "note": "a separate run with the runtime's profiler on: its overhead is not in the end-to-end latency; "
                "node names are the runtime's after its graph fusions",
        "sum_of_medians_ms": sum(t.median_us for t in layers) / 1e3,
        "layers": [asdict(t) for t in layers],
    }


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM / VmPeak of this process in bytes (Linux)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmPeak"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def memory_before() -> dict[str, Any]:
    """RSS before the model is loaded; the peak counter is reset so VmHWM afterwards is this run's peak."""
    try:
        rss = _proc_status()["VmRSS"]
    except (OSError, KeyError, ValueError) as e:
        return {"error": f"/proc/self/status unreadable ({e})"}
    try:
        Path("/proc/self/clear_refs").write_text("5")   # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
        reset = True
    except OSError:
        reset = False
    return {"rss_before_load_bytes": rss, "peak_reset": reset}


def memory_after(before: dict[str, Any], runner: object) -> dict[str, Any]:
    if "error" in before:
        return {"method": "unavailable", "reason": before["error"]}
    status = _proc_status()
    peak = status["VmHWM"]
    return {
        "method": "measured", "source": "/proc/self/status VmHWM (peak resident set) after the timed runs",
        "peak_rss_bytes": peak, "rss_before_load_bytes": before["rss_before_load_bytes"],
        "peak_minus_before_bytes": peak - before["rss_before_load_bytes"],
        "peak_reset_before_load": before["peak_reset"],
        "note": ("peak since the model was loaded (counter reset by /proc/self/clear_refs)" if before["peak_reset"]
                 else "peak over the whole process life: the reset of the peak counter was refused"),
        "runtime": {"method": "unavailable",
                    "reason": f"{type(runner).__name__}'s runtime exposes no memory statistics through its Python API"},
    }


# --- system state and environment --------------------------------------------------------------

def _read_sysfs_numbers(pattern: str, what: str) -> dict[str, Any]:
    found = {}
    for p in sorted(glob.glob(pattern)):
        try:
            found[p] = int(Path(p).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    if not found:
        return {"unavailable": f"{what}: nothing readable at {pattern} (a VM or a kernel without it)"}
    return found


def system_state() -> dict[str, Any]:
    """CPU frequency (kHz, per CPU) and thermal zone temperatures (degrees C) right now."""
    freq = _read_sysfs_numbers("/sys/devices/system/cpu/cpu*/cpufreq/scaling_cur_freq", "cpufreq")
    temps = _read_sysfs_numbers("/sys/class/thermal/thermal_zone*/temp", "thermal zones")
    if "unavailable" not in temps:
        temps = {p: v / 1000.0 for p, v in temps.items()}   # sysfs reports millidegrees
    return {"cpu_freq_khz": freq, "temperature_c": temps}


def _affinity() -> list[int] | str:
    if not hasattr(os, "sched_getaffinity"):
        return "unavailable: os.sched_getaffinity does not exist on this OS"
    return sorted(os.sched_getaffinity(0))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Hardware", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runner_flags(runner: object) -> dict[str, Any]:
    """The settings the runtime reports for this loaded model (asked from the runtime, not assumed)."""
    if hasattr(runner, "session"):   # ONNX Runtime
        o = runner.session.get_session_options()
        return {"intra_op_num_threads": o.intra_op_num_threads, "inter_op_num_threads": o.inter_op_num_threads,
                "graph_optimization_level": str(o.graph_optimization_level),
                "execution_mode": str(o.execution_mode), "providers": runner.session.get_providers()}
    if hasattr(runner, "compiled"):  # OpenVINO
        keys = ("INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "NUM_STREAMS", "PERFORMANCE_HINT",
                "ENABLE_CPU_PINNING", "ENABLE_HYPER_THREADING", "SCHEDULING_CORE_TYPE", "PERF_COUNT")
        return {k: _ov_property(runner.compiled, k) for k in keys}
    return {"unavailable": f"{type(runner).__name__} reports no runtime flags"}


def _ov_property(compiled: Any, key: str) -> str:
    try:
        return str(compiled.get_property(key))
    except Exception as e:  # noqa: BLE001 - the plugin raises RuntimeError for unsupported keys
        return f"unavailable ({type(e).__name__})"


def environment(art: Artifact, runner: object) -> dict[str, Any]:
    thread_env = {k: v for k, v in os.environ.items()
                  if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OV_CPU_THREADS_NUM")}
    return {
        "python": platform.python_version(), "numpy": np.__version__,
        "runtime": art.backend, "runtime_version": get_backend(art.backend).runtime_version(),
        "runtime_version_at_export": art.manifest["backend"].get("runtime_version"),
        "runtime_flags": runner_flags(runner), "thread_env": thread_env,
        "os": platform.platform(), "machine": platform.machine(), "hostname": platform.node(),
        "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
    }


def artifact_info(art: Artifact) -> dict[str, Any]:
    precision = art.manifest.get("precision", {})
    counts: dict[str, int] = {}
    for p in (precision.values() if isinstance(precision, dict) else [precision]):
        counts[p] = counts.get(p, 0) + 1
    metrics = art.manifest.get("metrics", {})
    return {
        "path": str(Path(art.path).resolve()), "sha256": sha256_file(Path(art.path) / MANIFEST),
        "sha256_of": MANIFEST, "model": art.manifest.get("model", {}).get("name"),
        "precision_layers": counts, "macs": metrics.get("macs"), "model_bytes": metrics.get("model_bytes"),
        "params": metrics.get("params"),
    }


# --- energy ------------------------------------------------------------------------------------

def make_sensor(name: str, *, serial: str | None = None, meter_csv: str | Path | None = None,
                root: str | Path = "/") -> Sensor:
    """The sensor a devices.yaml ``energy_sensor`` names (android needs ``serial``, usb_meter ``meter_csv``)."""
    from edge_compress.profile import energy as e

    if name == "android" and serial is None:
        raise ConfigError("energy sensor 'android' needs the phone's ADB serial (devices.yaml field 'serial')")
    if name == "usb_meter" and meter_csv is None:
        raise ConfigError("energy sensor 'usb_meter' needs the meter's CSV (devices.yaml field 'meter_csv')")
    makers: dict[str, Callable[[], Sensor]] = {
        "rapl": lambda: e.RaplSensor(root), "ina3221": lambda: e.Ina3221Sensor(root),
        "tegrastats": lambda: e.TegrastatsSensor(root=root), "ina2xx": lambda: e.Ina2xxSensor(root),
        "android": lambda: e.AndroidBatterySensor(serial), "usb_meter": lambda: e.UsbMeterCsvSensor(meter_csv),
    }
    if name not in makers:
        raise ConfigError(f"energy sensor {name!r} is not a sensor; choose one of: {', '.join(makers)}")
    return makers[name]()


def sensor_for_device(device: DeviceConfig, energy: str | None = None) -> Sensor | None:
    """The sensor object ``energy`` (default: the device's energy_sensor) needs built from the device's
    fields (android: ``serial``, usb_meter: ``meter_csv``); None for the sensors a name alone selects."""
    energy = energy or device.energy_sensor
    if energy in ("android", "usb_meter"):
        return make_sensor(energy, serial=device.serial, meter_csv=device.meter_csv)
    return None


def choose_sensor(settings: ProfileSettings, sensor: Sensor | None) -> tuple[Sensor | None, dict[str, Any]]:
    """The sensor to measure with (None: estimate or no energy) and how it was chosen, before any timing."""
    if sensor is not None:
        return _usable(sensor, "given by the caller"), {"requested": sensor.name}
    if settings.energy in ("estimate", "none"):
        return None, {"requested": settings.energy}
    if settings.energy == "auto":
        statuses = detect_sensors()
        ok = [s for s in statuses if s.ok]
        if ok:
            return ok[0].sensor, {"requested": "auto", "chosen": ok[0].name, "why": ok[0].reason}
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in statuses)
        return None, {"requested": "auto", "chosen": "estimate", "why": f"no usable sensor here ({reasons})"}
    return _named_sensor(settings.energy)


def _named_sensor(name: str) -> tuple[Sensor, dict[str, Any]]:
    first = make_sensor(name)
    ok, reason = first.available()
    if ok:
        return first, {"requested": name}
    if name in SENSOR_FALLBACKS:
        alt = make_sensor(SENSOR_FALLBACKS[name])
        alt_ok, alt_reason = alt.available()
        if alt_ok:
            return alt, {"requested": name, "chosen": alt.name, "why": f"fell back: {name} unusable ({reason})"}
        reason = f"{reason}; fallback {alt.name}: {alt_reason}"
    raise ConfigError(f"energy sensor '{name}' is not usable here: {reason}; profile with --energy estimate "
                      "(labelled an estimate) or --energy none")


def _usable(sensor: Sensor, how: str) -> Sensor:
    ok, reason = sensor.available()
    if not ok:
        raise ConfigError(f"energy sensor '{sensor.name}' ({how}) is not usable: {reason}")
    return sensor


def measured_energy(sensor: Sensor, run: Callable[[], object], p50_ms: float,
                    settings: ProfileSettings) -> dict[str, Any]:
    """Idle window, then ``energy_window_s`` of back-to-back inferences, both on ``sensor``."""
    n = max(1, math.ceil(settings.energy_window_s * 1e3 / p50_ms))
    c = measure_with_idle(sensor, lambda: [run() for _ in range(n)], settings.energy_idle_s, inferences=n)
    return {
        "method": c.gross.method, "measured": True, "label": "measured",
        "mj_per_inference": c.mj_per_inference, "error_mj": c.mj_per_inference_error,
        "gross_mj_per_inference": c.gross_mj_per_inference, "idle_watts": c.idle_watts,
        "inferences": n, "window_s": c.gross.window_s, "idle_window_s": c.idle.window_s,
        "sample_count": c.gross.sample_count, "sampling_hz": c.gross.sampling_hz,
        "note": "a separate window after the latency run: idle power measured just before on the same sensor "
                "and subtracted; error_mj is a bound (energy/reading.py)",
    }


def estimated_energy(info: dict[str, Any], p50_ms: float) -> dict[str, Any]:
    """Horowitz-table estimate from the manifest's MACs and model bytes: labelled, never a measurement."""
    macs, nbytes = info.get("macs"), info.get("model_bytes")
    if macs is None or nbytes is None:
        return {"method": "none", "measured": False, "label": "none",
                "reason": "the manifest has no macs/model_bytes to estimate from (re-export the artifact)"}
    counts = info["precision_layers"]
    dtype = "int8" if counts.get("int8", 0) > sum(counts.values()) / 2 else "fp32"
    r = estimate_energy(int(macs), int(nbytes), dtype=dtype, latency_s=p50_ms / 1e3)
    from edge_compress.profile.energy.estimate import HOROWITZ_45NM

    return {
        "method": "estimated", "measured": False, "label": "estimated",
        "mj_per_inference": r.joules * 1e3, "error_mj": r.error_j * 1e3, "mean_watts": r.mean_watts,
        "source": HOROWITZ_45NM.source,
        "assumptions": f"{macs} MACs from the manifest counted as {dtype} (the precision of most conv layers); "
                       f"bytes moved = model_bytes {nbytes} (weights read once from DRAM; activations not counted); "
                       "error_mj is the upper band: the real figure can be several times larger",
    }


def energy_section(sensor: Sensor | None, how: dict[str, Any], settings: ProfileSettings, run: Callable[[], object],
                   p50_ms: float, info: dict[str, Any]) -> dict[str, Any]:
    if settings.energy == "none" and sensor is None:
        return {"method": "none", "measured": False, "label": "none", "reason": "energy=none", "chosen_by": how}
    if sensor is None:
        return {**estimated_energy(info, p50_ms), "chosen_by": how}
    return {**measured_energy(sensor, run, p50_ms, settings), "chosen_by": how}


# --- the verb ----------------------------------------------------------------------------------

def profile_artifact(artifact: str | Path, settings: ProfileSettings = ProfileSettings(), device: str = "local",
                     sensor: Sensor | None = None) -> dict[str, Any]:
    """Profile ``artifact`` here and return its record (JSON-able). ``device`` is the name recorded.

    ``sensor`` (a ``Sensor``) overrides ``settings.energy``; an explicitly named
    sensor that is unusable here is an error (with its reason), never a silent estimate.
    """
    art = load_artifact(artifact)
    sensor, how = choose_sensor(settings, sensor)
    x, input_info = make_input(art.input_spec)
    info, state_before = artifact_info(art), system_state()
    measured = _timed_session(art, x, settings, sensor, how, info)   # its runtime session is closed on return
    return {
        "schema_version": SCHEMA_VERSION, "kind": "edge_compress.profile",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "device": device, "backend": art.backend, "artifact": info,
        "settings": settings.to_dict(), "settings_hash": settings.digest(), "input": input_info,
        "latency": measured["latency"], "per_layer": per_layer(art, x, settings), "memory": measured["memory"],
        "energy": measured["energy"],
        "system": {"threads": settings.threads, "cpu_affinity": _affinity(),
                   "before": state_before, "after": measured["state_after"]},
        "environment": measured["environment"],
    }


def _timed_session(art: Artifact, x: np.ndarray, settings: ProfileSettings, sensor: Sensor | None,
                   how: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """Load the model, time it, read the memory peak, then the energy window: one runtime session."""
    from edge_compress.runtime import open_runner

    mem = memory_before()
    runner = open_runner(art, settings.threads)
    latency = time_runs(lambda: runner(x), settings, runtime_timer(runner))
    memory = memory_after(mem, runner)   # before the energy and per-layer runs, which allocate too
    energy = energy_section(sensor, how, settings, lambda: runner(x), latency["p50"], info)
    return {"latency": latency, "memory": memory, "energy": energy, "state_after": system_state(),
            "environment": environment(art, runner)}


def attach_device(record: dict[str, Any], device: DeviceConfig) -> dict[str, Any]:
    """The record with the device's name and registry entry (power mode, sensor, connection) added."""
    if not isinstance(record, dict) or "latency" not in record:
        raise EdgeCompressError(f"device '{device.name}' returned no profile record (got {type(record).__name__})")
    return {**record, "device": device.name, "device_config": device.to_dict()}
