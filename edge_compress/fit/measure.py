"""Build a candidate's artifact and measure it on the device: the two jobs ``fit`` farms out.

``build_candidate(BuildJob)`` runs in a worker (process pool or Ray task): it loads
the detector from its checkpoint, prunes it to the candidate's ratios and exports
it for the backend, int8 where the candidate says (calibrated on a few training
images: a QDQ graph runs the same kernels whatever its scales, so the latency of a
candidate does not depend on the calibration; the chosen candidate is exported
again with the full calibration and its mAP). It returns a plain dict, with the
error when the candidate cannot be built: a failed candidate is data, not a crash.

A measurement is ``job.sessions`` profiling sessions of the artifact on the device
(``profile_session``, ``profile_on_device``: local, agent, ssh or adb), each in a
fresh process: on this VM the same artifact timed back to back in fresh
processes spread over +-6% (4.6-5.2 ms), while one session's median is stable to
1%, so a single session's luck is most of a candidate's error. The median
session (by p50) is the measurement and its record keeps the others' figures
(``file_measurement``); it is filed in the profile store at once (so an
interrupted fit loses no measurement) and the artifact's model files are then
dropped (the manifest stays, the record points to it).

The machine's luck comes in phases: on this VM the residuals of 213 sessions
against the latency model correlate at 0.43 between consecutive sessions and at
0 six sessions apart, so the sessions of a batch of candidates are interleaved
(``interleaved``: session 1 of every candidate, then session 2 of every one, ...)
and a slow phase falls on one session of several candidates, which the median
drops, rather than on every session of one. Replayed on those residuals, the
median of three interleaved sessions (batches of 5) was within +-10% of the
typical level in 89% of candidates, against 73% for three back-to-back sessions.
``measure_fresh`` measures a list of jobs this way in fresh processes.
"""

from __future__ import annotations

import shutil
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

MANIFEST = "manifest.json"
# How a candidate's artifact is built; part of every fit measurement's environment, so a change to what
# the same candidate key builds makes the measurements of the old builds stale. 2: a float conv's
# activation, pooling, Add and Mul stay float (``quant.qdq.float_neighbours``); before, they were QDQ.
# 3: so do the nodes that feed a float conv (ONNX Runtime ran them as slow NCHW int8 kernels). 4: ONNX Runtime
# runs the graph without QDQPropagationTransformer (``backends.ort.DISABLED_OPTIMIZERS``), which moved the
# quantization of an int8 conv's input up across a float MaxPool (a mixed candidate ran 0.4-3 ms slower).
CANDIDATE_BUILD = 4


@dataclass(frozen=True)
class BuildJob:
    checkpoint: str
    key: str
    ratios: dict[str, float]
    round_to: int
    min_channels: int
    keep_fp32: tuple[str, ...]
    int8: bool
    backend: str
    data: str
    out: str
    threads: int = 1
    calib_images: int = 8
    fit_run: str = ""


@dataclass(frozen=True)
class MeasureJob:
    key: str
    artifact: str
    device: dict[str, Any]         # DeviceConfig.to_dict() (plain data: picklable, Ray-friendly)
    settings: dict[str, Any]       # ProfileSettings.to_dict()
    store: str
    keep_model: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    sessions: int = 1


def build_model(checkpoint: str, ratios: dict[str, float], round_to: int, min_channels: int,
                recalibrate_bn: int = 0, bn_batches=None):
    """The detector of ``checkpoint`` pruned to per-conv ``ratios`` (no pruning when empty)."""
    from edge_compress.compress.structured import ChannelPruneConfig, prune_channels
    from edge_compress.train import load_detector

    model = load_detector(checkpoint).cpu().eval()
    if ratios:
        prune_channels(model, ChannelPruneConfig(ratio=dict(ratios), round_to=round_to, min_channels=min_channels,
                                                 recalibrate_bn=recalibrate_bn), bn_batches=bn_batches)
    return model.eval()


def build_candidate(job: BuildJob) -> dict[str, Any]:
    """Prune + export one candidate into ``job.out``; ``{"key", "artifact"}`` or ``{"key", "error"}``."""
    t0 = time.perf_counter()
    try:
        import warnings

        from edge_compress.export import export_model
        from edge_compress.quant import QuantConfig

        model = build_model(job.checkpoint, job.ratios, job.round_to, job.min_channels)
        quant = QuantConfig(num_images=job.calib_images, keep_fp32=job.keep_fp32) if job.int8 else None
        recipe = {"steps": [], "fit": {"run": job.fit_run, "candidate": job.key, "prune_ratios": job.ratios,
                                       "keep_fp32": list(job.keep_fp32), "int8": job.int8}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            art = export_model(model, job.backend, job.out, quant=quant, data=job.data if job.int8 else None,
                               recipe=recipe, threads=job.threads, evaluate=False, latency_check=False)
        return {"key": job.key, "artifact": str(art.path), "build_s": time.perf_counter() - t0,
                "model_bytes": art.manifest["metrics"].get("model_bytes"),
                "params": art.manifest["metrics"].get("params"), "macs": art.manifest["metrics"].get("macs")}
    except Exception as e:  # noqa: BLE001 - a candidate that cannot be built is recorded with its reason
        shutil.rmtree(job.out, ignore_errors=True)
        return {"key": job.key, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=4), "build_s": time.perf_counter() - t0}


def measure_settings(max_seconds: float, threads: int, per_layer: bool = False, energy: str = "none") -> dict[str, Any]:
    """``ProfileSettings`` of a fit measurement (``MeasureJob.settings``): up to ``max_seconds`` of timing
    after a second of warm-up (a CPU that sat idle while the candidates were built runs slow at first)."""
    from edge_compress.profile.profiler import ProfileSettings

    return ProfileSettings(warmup=5, warmup_seconds=1.0, min_repeats=20, max_seconds=max_seconds, threads=threads,
                           per_layer=per_layer, energy=energy).to_dict()


def interleaved(jobs: list[MeasureJob], run_all: Callable[[list[MeasureJob]], list[dict[str, Any]]]
                ) -> list[dict[str, Any]]:
    """The measurements of ``jobs``, their sessions run by ``run_all`` (one after another, in the order
    given) interleaved: session 1 of every job, then session 2 of every job, ... (see the module
    docstring); then each job's sessions filed (``file_measurement``), in the order of ``jobs``."""
    order = [i for s in range(max((j.sessions for j in jobs), default=0)) for i, j in enumerate(jobs)
             if s < j.sessions]
    sessions: list[list[dict[str, Any]]] = [[] for _ in jobs]
    for i, result in zip(order, run_all([jobs[i] for i in order])):
        sessions[i].append(result)
    return [file_measurement(j, s) for j, s in zip(jobs, sessions)]


def measure_fresh(jobs: MeasureJob | list[MeasureJob]) -> dict[str, Any] | list[dict[str, Any]]:
    """Each of ``jobs``' sessions in a fresh spawned process, interleaved, then filed: how ``fit``
    measures on ``local`` with the process executor, for callers outside a fit (the benchmarks, the
    demo). One job in, one measurement out; a list in, a list out."""
    from edge_compress.fit.executor import InlineExecutor

    ex = InlineExecutor()
    try:
        out = interleaved([jobs] if isinstance(jobs, MeasureJob) else list(jobs),
                          lambda order: ex.measure_all(profile_session, order, True))
    finally:
        ex.close()
    return out[0] if isinstance(jobs, MeasureJob) else out


def profile_session(job: MeasureJob) -> dict[str, Any]:
    """One profiling session of ``job.artifact`` on the device: ``{"key", "record"}`` or ``{"key", "error"}``."""
    from edge_compress.profile.devices import DeviceConfig
    from edge_compress.profile.profiler import ProfileSettings
    from edge_compress.profile.remote import profile_on_device

    device = DeviceConfig(**job.device)
    quiet = wait_for_quiet() if device.connection == "local" else None
    try:
        record = profile_on_device(device, job.artifact, ProfileSettings.from_dict(job.settings))
    except Exception as e:  # noqa: BLE001 - recorded with its reason (a device that dropped out, a bad artifact)
        return {"key": job.key, "error": f"{type(e).__name__}: {e}"}
    return {"key": job.key, "record": record, **({"quiet": quiet} if quiet else {})}


def file_measurement(job: MeasureJob, sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """The median session (by p50) of ``sessions`` as one record, with every session's figures in
    ``latency.sessions``, filed in the store; a failed session fails the measurement."""
    from edge_compress.profile.store import ProfileStore

    failed = [s["error"] for s in sessions if "error" in s]
    if failed or not sessions:
        return {"key": job.key, "error": failed[0] if failed else "no profiling session ran"}
    order = sorted(range(len(sessions)), key=lambda i: sessions[i]["record"]["latency"]["p50"])
    median = sessions[order[len(order) // 2]]
    record = median["record"]
    record["latency"] = {**record["latency"], "sessions": [
        {k: s["record"]["latency"][k] for k in ("p50", "p90", "p99", "mean", "repeats")} for s in sessions],
        "sessions_note": f"the median of {len(sessions)} sessions, each in a fresh process (by p50): its "
                         "figures are this record's; the others' are listed here"}
    quiet = [s["quiet"] for s in sessions if "quiet" in s]
    # filed_utc: when filed, in the order of the batch's jobs (created_utc is the median session's start,
    # which interleaving puts in another order): a resumed fit recovers its measurements in this order
    record = {**record, "fit": {"candidate": job.key, **job.extra, **({"quiet": quiet} if quiet else {}),
                                "filed_utc": datetime.now(timezone.utc).isoformat(timespec="microseconds")}}
    path = ProfileStore(job.store).add(record)
    if not job.keep_model:
        drop_model_files(Path(job.artifact))
    return summarize_record(job.key, record, path)


def wait_for_quiet(max_other: float = 0.15, window_s: float = 0.25, timeout_s: float = 15.0) -> dict[str, Any]:
    """Before timing on this machine, wait (up to ``timeout_s``) until the other processes use less than
    ``max_other`` of one CPU over ``window_s`` (``/proc/stat`` less our own ``/proc/self/stat``): a
    busy neighbour time-slices the measured model. Returns what was seen (recorded with the measurement)."""
    t0 = time.perf_counter()
    other = None
    while time.perf_counter() - t0 < timeout_s:
        other = _other_cpu(window_s)
        if other is None or other < max_other:
            break
    return {"other_cpu": other, "waited_s": round(time.perf_counter() - t0, 3),
            "quiet": other is None or other < max_other}


def _other_cpu(window_s: float) -> float | None:
    """CPUs' worth of busy time of every other process over ``window_s`` (None where /proc is unreadable)."""
    import os

    def busy() -> tuple[float, float]:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        total_busy = sum(int(v) for i, v in enumerate(fields[:8]) if i not in (3, 4))   # not idle, not iowait
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return total_busy, int(mine[11]) + int(mine[12])                                 # utime + stime

    try:
        tick = os.sysconf("SC_CLK_TCK")
        b0, m0 = busy()
        time.sleep(window_s)
        b1, m1 = busy()
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, ((b1 - b0) - (m1 - m0)) / tick / window_s)


def summarize_record(key: str, record: dict[str, Any], path: Path | str) -> dict[str, Any]:
    lat, energy = record["latency"], record.get("energy", {})
    return {"key": key, "record": str(path), "record_id": record.get("id", Path(path).stem),
            "p50": lat["p50"], "p90": lat["p90"], "p99": lat["p99"], "repeats": lat["repeats"],
            "energy_mj": energy.get("mj_per_inference"), "energy_label": energy.get("label"),
            "size_bytes": record["artifact"].get("model_bytes"),
            "sessions_p50": [x["p50"] for x in lat.get("sessions", [])],
            "environment": measurement_environment(record)}


def measurement_environment(record: dict[str, Any]) -> dict[str, Any]:
    """What a latency depends on besides the model: the latency model's validity key."""
    env, dev = record.get("environment", {}), record.get("device_config", {})
    return {"device": record["device"], "backend": record["backend"],
            "runtime_version": env.get("runtime_version"), "threads": record.get("settings", {}).get("threads"),
            "cpu_model": env.get("cpu_model"), "power_mode": dev.get("power_mode"),
            "connection": dev.get("connection"), "host": dev.get("host") or dev.get("serial"),
            "candidate_build": record.get("fit", {}).get("build")}


def drop_model_files(artifact: Path) -> None:
    """Remove an artifact's model files, keeping its manifest (which its profile records hash)."""
    for p in artifact.iterdir():
        if p.name != MANIFEST:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
