"""The profiler: the median's stopping rule, real artifacts on ONNX Runtime and OpenVINO, energy labels, no torch."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
import time
from fractions import Fraction
from math import comb

import pytest

from edge_compress.errors import ConfigError
from edge_compress.profile import profiler
from edge_compress.profile.energy import EnergyReading
from edge_compress.profile.profiler import (
    ProfileSettings,
    median_ci,
    median_ci_ranks,
    profile_artifact,
    time_runs,
)

FAST = ProfileSettings(warmup=2, max_seconds=0.3, max_repeats=200, per_layer=True, energy="auto")


@pytest.fixture(scope="module")
def ort_art(ort_artifact):
    return ort_artifact


# --- the stopping rule -------------------------------------------------------------------------

def _miss(n: int, l: int) -> Fraction:
    """Exact probability that [x_(l), x_(n+1-l)] misses the median: 2 P(Bin(n, 1/2) <= l - 1)."""
    return 2 * Fraction(sum(comb(n, i) for i in range(l)), 2**n)


@pytest.mark.parametrize("n", [*range(1, 40), 100, 257, 1000])
def test_median_ci_ranks_are_the_tightest_95_percent_interval(n):
    ranks = median_ci_ranks(n)
    if n < 6:   # 2 / 2**5 = 6.25% > 5%: no 95% interval from 5 samples
        assert ranks is None
        return
    l, u = ranks
    assert u == n + 1 - l
    assert _miss(n, l) <= Fraction(5, 100) < _miss(n, l + 1)


def test_median_ci_known_values():
    assert median_ci_ranks(20) == (6, 15)
    assert median_ci(list(range(20, 0, -1))) == (6, 15)
    assert median_ci([1.0] * 5) is None


def _fake_timer(monkeypatch, values):
    it = iter(values)
    monkeypatch.setattr(profiler, "_time_once", lambda run: next(it))


def test_constant_times_converge_at_min_repeats(monkeypatch):
    _fake_timer(monkeypatch, itertools.repeat(2.0))
    lat = time_runs(lambda: None, ProfileSettings(warmup=3, min_repeats=20))
    assert (lat["stopped"], lat["repeats"], lat["warmup"]) == ("converged", 20, 3)
    assert lat["p50"] == lat["p99"] == 2.0 and lat["median_ci95_rel_halfwidth"] == 0.0
    assert len(lat["samples_ms"]) == 20 and len(lat["warmup_ms"]) == 3


def _uniform(seed=0):
    rng = random.Random(seed)
    return iter(lambda: rng.uniform(1.0, 3.0), None)


def test_spread_times_hit_max_repeats(monkeypatch):
    _fake_timer(monkeypatch, _uniform())   # +-50% spread: 60 samples cannot pin the median to 1%
    lat = time_runs(lambda: None, ProfileSettings(warmup=0, min_repeats=20, max_repeats=60))
    assert (lat["stopped"], lat["repeats"]) == ("max_repeats", 60)
    assert lat["median_ci95_rel_halfwidth"] > 0.01 and "max_repeats=60" in lat["stop_reason"]
    lo, hi = lat["median_ci95"]
    assert lo <= lat["p50"] <= hi


def test_time_cap_wins_over_min_repeats(monkeypatch):
    values = _uniform()

    def slow(run):
        time.sleep(0.01)
        return next(values)

    monkeypatch.setattr(profiler, "_time_once", slow)
    lat = time_runs(lambda: None, ProfileSettings(warmup=0, min_repeats=100, max_seconds=0.1))
    assert lat["stopped"] == "max_seconds" and 1 <= lat["repeats"] < 100


def test_settings_round_trip_reject_unknown_keys_and_bad_values():
    s = ProfileSettings(threads=2, energy="none")
    assert ProfileSettings.from_dict(s.to_dict()) == s
    assert s.digest() == ProfileSettings.from_dict(json.loads(json.dumps(s.to_dict()))).digest()
    assert s.digest() != ProfileSettings(threads=1, energy="none").digest()
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['repeats'\]"):
        ProfileSettings.from_dict({"repeats": 5})
    with pytest.raises(ConfigError, match="energy='joulemeter'; choose one of: auto"):
        ProfileSettings(energy="joulemeter")
    with pytest.raises(ConfigError, match="min_repeats"):
        ProfileSettings(min_repeats=50, max_repeats=10)
    with pytest.raises(ConfigError, match="threads=True"):
        ProfileSettings(threads=True)


# --- real artifacts ----------------------------------------------------------------------------

def test_onnxruntime_record_says_how_every_number_was_obtained(ort_art):
    r = profile_artifact(ort_art, FAST, device="bench")
    lat = r["latency"]
    assert r["device"] == "bench" and r["backend"] == "onnxruntime"
    assert lat["method"] == "measured" and lat["warmup"] == 2 and lat["repeats"] == len(lat["samples_ms"]) >= 1
    assert lat["stopped"] in ("converged", "max_repeats", "max_seconds")
    assert min(lat["samples_ms"]) <= lat["p50"] <= lat["p90"] <= lat["p99"] <= max(lat["samples_ms"])
    pl = r["per_layer"]
    assert pl["method"] == "measured" and pl["separate_run"] and pl["layers"]
    assert {"name", "op_type", "median_us", "samples"} <= set(pl["layers"][0])
    assert r["memory"]["method"] == "measured" and r["memory"]["peak_rss_bytes"] >= r["memory"]["rss_before_load_bytes"]
    e = r["energy"]   # this VM has no sensor: auto falls back to the estimate, labelled
    assert (e["method"], e["measured"], e["label"]) == ("estimated", False, "estimated")
    assert e["mj_per_inference"] > 0 and "Horowitz" in e["source"] and "auto" == e["chosen_by"]["requested"]
    assert r["environment"]["runtime_flags"]["intra_op_num_threads"] == 1
    assert "runtime_reported" not in lat   # ONNX Runtime keeps no per-call latency
    assert r["artifact"]["sha256"] == profiler.sha256_file(ort_art / "manifest.json")
    assert r["artifact"]["model"] == "ssdlite_mbv2" and r["artifact"]["precision_layers"] == {"fp32": 66}
    assert r["input"]["shape"] == [1, 3, 64, 64] and "seed 0" in r["input"]["kind"]
    for when in ("before", "after"):
        assert set(r["system"][when]) == {"cpu_freq_khz", "temperature_c"}
    assert r["settings_hash"] == FAST.digest()
    json.dumps(r)   # JSON-able


def test_openvino_runs_with_the_threads_and_precision_asked(tiny_artifact):
    art = tiny_artifact("openvino")
    r = profile_artifact(art, ProfileSettings(warmup=1, max_seconds=0.2, energy="none", per_layer=False))
    flags = r["environment"]["runtime_flags"]
    assert flags["INFERENCE_NUM_THREADS"] == "1" and "f32" in flags["INFERENCE_PRECISION_HINT"].replace("float", "f")
    assert r["per_layer"]["method"] == "not run" and r["energy"]["label"] == "none"
    own, lat = r["latency"]["runtime_reported"], r["latency"]
    assert len(own["samples_ms"]) == lat["repeats"] and "InferRequest.latency" in own["source"]
    assert all(o <= w for o, w in zip(own["samples_ms"], lat["samples_ms"]))   # our timer wraps the runtime's


class FakeSensor:
    """Idle at 1 W, 3 W while inferences run: a sensor reporting what the clock saw."""

    name = "fake-rapl"
    kind = "measured"

    def __init__(self):
        self.windows = 0

    def available(self):
        return True, "fake"

    def start(self):
        self.t0 = time.perf_counter()

    def stop(self):
        dt = time.perf_counter() - self.t0
        watts = 1.0 if self.windows == 0 else 3.0
        self.windows += 1
        return EnergyReading(watts * dt, dt, watts, 2, 1000.0, "rapl", 0.001, True)


def test_measured_energy_subtracts_idle_and_is_labelled_measured(ort_art):
    s = ProfileSettings(warmup=1, max_seconds=0.1, per_layer=False, energy_idle_s=0.05, energy_window_s=0.05)
    e = profile_artifact(ort_art, s, sensor=FakeSensor())["energy"]
    assert (e["method"], e["measured"], e["label"]) == ("rapl", True, "measured")
    assert e["idle_watts"] == pytest.approx(1.0) and e["inferences"] >= 1
    per_inf_window_mj = e["window_s"] * 1e3 / e["inferences"]
    assert e["mj_per_inference"] == pytest.approx(2.0 * per_inf_window_mj, rel=1e-6)


def test_named_sensor_missing_here_is_an_error_never_a_silent_estimate(ort_art):
    with pytest.raises(ConfigError, match="energy sensor 'rapl' is not usable here: .*--energy estimate"):
        profile_artifact(ort_art, ProfileSettings(energy="rapl"))
    with pytest.raises(ConfigError, match="'ina3221' is not usable here: .*fallback tegrastats"):
        profile_artifact(ort_art, ProfileSettings(energy="ina3221"))
    with pytest.raises(ConfigError, match="ADB serial"):
        profile_artifact(ort_art, ProfileSettings(energy="android"))


def test_ina3221_falls_back_to_tegrastats_and_says_so(monkeypatch):
    class Stub:
        def __init__(self, name, ok):
            self.name, self.ok = name, ok

        def available(self):
            return self.ok, "no hwmon rails" if not self.ok else "ok"

    monkeypatch.setattr(profiler, "make_sensor", lambda name, **kw: Stub(name, name == "tegrastats"))
    sensor, how = profiler.choose_sensor(ProfileSettings(energy="ina3221"), None)
    assert sensor.name == "tegrastats" and how["chosen"] == "tegrastats" and "no hwmon rails" in how["why"]


def test_estimate_without_manifest_counts_is_none_not_zero():
    e = profiler.estimated_energy({"macs": None, "model_bytes": None, "precision_layers": {}}, 1.0)
    assert e["label"] == "none" and "mj_per_inference" not in e and "re-export" in e["reason"]


def test_device_side_modules_never_import_torch(ort_art):
    code = (
        "import sys\n"
        "from edge_compress.profile import devices, profiler, store\n"
        "from edge_compress.cli import profile_cmd\n"
        f"r = profiler.profile_artifact({str(ort_art)!r}, profiler.ProfileSettings(warmup=1, max_seconds=0.1))\n"
        "store.ProfileStore(sys.argv[1]).add(r)\n"
        "bad = [m for m in ('torch', 'torchvision') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok', r['per_layer']['method'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ort_art.parent / "store_no_torch")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok measured"
