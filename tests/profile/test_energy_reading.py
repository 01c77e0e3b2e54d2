"""Readings, combination rules, idle subtraction, the Horowitz estimate, detection, and no torch import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edge_compress.errors import ConfigError, DataError
from edge_compress.profile.energy import (
    HOROWITZ_45NM,
    EnergyReading,
    MixedReadingsError,
    PowerSample,
    combine_readings,
    detect_sensors,
    estimate_energy,
    measure_with_idle,
    sampled_error_j,
    subtract_idle,
)
from edge_compress.profile.energy.estimate import OpEnergyTable


def rapl(joules, window, error=0.0):
    return EnergyReading(joules, window, joules / window, 2, 1000.0, "rapl", error, True)


def test_reading_kind_is_tied_to_method():
    with pytest.raises(ConfigError, match="only method 'estimated' is unmeasured"):
        EnergyReading(1.0, 1.0, 1.0, 2, 10.0, "estimated", 0.0, True)
    with pytest.raises(ConfigError, match="only method 'estimated' is unmeasured"):
        EnergyReading(1.0, 1.0, 1.0, 2, 10.0, "rapl", 0.0, False)
    with pytest.raises(ConfigError, match="method 'joulescope' is unknown; choices: rapl, ina3221-hwmon"):
        EnergyReading(1.0, 1.0, 1.0, 2, 10.0, "joulescope", 0.0, True)
    with pytest.raises(DataError, match="expected finite joules"):
        EnergyReading(float("nan"), 1.0, 1.0, 2, 10.0, "rapl", 0.0, True)
    assert rapl(2.0, 1.0).millijoules_per_inference(4) == 500.0


def test_sampled_error_formula_by_hand():
    samples = [PowerSample(0.0, 2.0, 0.01), PowerSample(0.5, 5.0, 0.02), PowerSample(1.0, 4.0, 0.01)]
    # dt = 0.5, max step = 3 W, max resolution 0.02 W over 1 s
    assert sampled_error_j(samples) == pytest.approx(0.5 * 3.0 + 0.02 * 1.0, rel=1e-12)


def test_combine_same_sensor_adds_up():
    r = combine_readings([rapl(3.0, 1.0, 0.1), rapl(5.0, 3.0, 0.2)])
    assert (r.joules, r.window_s, r.mean_watts, r.sample_count) == (8.0, 4.0, 2.0, 4)
    assert r.error_j == pytest.approx(0.3, rel=1e-12) and r.method == "rapl" and r.measured


def test_measured_and_estimated_never_mix():
    est = estimate_energy(10**9, 10**6, dtype="int8")
    with pytest.raises(MixedReadingsError, match="cannot combine estimated and measured"):
        combine_readings([rapl(1.0, 1.0), est])
    ina = EnergyReading(1.0, 1.0, 1.0, 11, 10.0, "ina3221-hwmon", 0.0, True)
    with pytest.raises(MixedReadingsError, match=r"different methods \['ina3221-hwmon', 'rapl'\]"):
        combine_readings([rapl(1.0, 1.0), ina])
    with pytest.raises(MixedReadingsError):
        subtract_idle(rapl(1.0, 1.0), est, inferences=1)


def test_idle_subtraction_arithmetic():
    idle = rapl(10.0, 5.0, error=0.05)  # 2 W idle
    gross = rapl(30.0, 10.0, error=0.1)
    c = subtract_idle(gross, idle, inferences=100)
    assert c.idle_watts == 2.0
    assert c.net_j == 10.0  # 30 - 2 W * 10 s
    assert c.net_error_j == pytest.approx(0.1 + 0.05 * 10.0 / 5.0, rel=1e-12)
    assert c.mj_per_inference == 100.0 and c.gross_mj_per_inference == 300.0
    assert c.mj_per_inference_error == pytest.approx(2.0, rel=1e-12)
    with pytest.raises(ConfigError, match="inferences=0"):
        subtract_idle(gross, idle, inferences=0)


class ScriptedSensor:
    name, kind = "scripted", "measured"

    def __init__(self, *readings):
        self.readings, self.events = list(readings), []

    def available(self):
        return True, "scripted"

    def start(self):
        self.events.append("start")

    def stop(self):
        self.events.append("stop")
        return self.readings.pop(0)


def test_measure_with_idle_runs_idle_then_workload():
    sensor = ScriptedSensor(rapl(4.0, 2.0), rapl(9.0, 3.0))  # 2 W idle; 9 J over 3 s
    slept, ran = [], []
    c = measure_with_idle(
        sensor, lambda: ran.append(sensor.events[:]), 2.0, inferences=30, sleep=slept.append
    )
    assert slept == [2.0] and ran == [["start", "stop", "start"]]
    assert sensor.events == ["start", "stop", "start", "stop"]
    assert c.net_j == 3.0 and c.mj_per_inference == 100.0


def test_measure_with_idle_closes_the_window_when_the_workload_fails():
    sensor = ScriptedSensor(rapl(4.0, 2.0), rapl(9.0, 3.0))

    def boom():
        raise RuntimeError("inference failed")

    with pytest.raises(RuntimeError, match="inference failed"):
        measure_with_idle(sensor, boom, 1.0, inferences=1, sleep=lambda s: None)
    assert sensor.events == ["start", "stop", "start", "stop"]
    with pytest.raises(ConfigError, match="idle_s=0"):
        measure_with_idle(sensor, boom, 0, inferences=1)


def test_estimate_against_hand_computation():
    # int8 MAC = 0.2 pJ mult + 0.1 pJ int32 accumulate; a DRAM byte = 640 pJ / 4
    r = estimate_energy(10**9, 10**6, dtype="int8")
    assert r.joules == pytest.approx(1e9 * 0.3e-12 + 1e6 * 160e-12, rel=1e-12)  # 4.6e-4 J
    assert (r.method, r.measured, r.kind, r.sample_count, r.sampling_hz) == ("estimated", False, "estimated", 0, None)
    assert r.error_j == pytest.approx(9 * r.joules, rel=1e-12) and r.mean_watts is None
    fp32 = estimate_energy(10**9, 10**6)  # 3.7 + 0.9 pJ per MAC
    assert fp32.joules == pytest.approx(4.6e-3 + 1.6e-4, rel=1e-12)
    mixed = estimate_energy({"int8": 10**9, "fp32": 10**6}, 4 * 10**6, memory="sram", latency_s=0.01)
    assert mixed.joules == pytest.approx(1e9 * 0.3e-12 + 1e6 * 4.6e-12 + 4e6 * 1.25e-12, rel=1e-12)
    assert mixed.mean_watts == pytest.approx(mixed.joules / 0.01, rel=1e-12)


def test_estimate_says_it_is_an_estimate_and_cites_its_source():
    assert "order-of-magnitude estimate" in estimate_energy.__doc__.lower()
    assert "Horowitz" in HOROWITZ_45NM.source and "ISSCC 2014" in HOROWITZ_45NM.source
    assert HOROWITZ_45NM.node_nm == 45


def test_estimate_rejects_unknown_choices():
    with pytest.raises(ConfigError, match="MAC dtype 'int4'; choices: int8, fp16, fp32"):
        estimate_energy(1, 1, dtype="int4")
    with pytest.raises(ConfigError, match="memory 'hbm'; choices: dram, sram"):
        estimate_energy(1, 1, memory="hbm")
    with pytest.raises(ConfigError, match="non-negative"):
        OpEnergyTable(**{**vars(HOROWITZ_45NM), "fp32_add_pj": -1.0})


def test_detect_on_an_empty_tree_explains_every_sensor(tmp_path):
    statuses = {s.name: s for s in detect_sensors(tmp_path)}
    assert set(statuses) == {"rapl", "ina3221-hwmon", "ina2xx-hwmon", "tegrastats", "android-battery", "usb-meter-csv"}
    assert not any(s.ok for s in statuses.values())
    assert "powercap does not exist" in statuses["rapl"].reason
    assert "adb_serial=" in statuses["android-battery"].reason


def test_detect_finds_fake_rapl_and_ina219(tree):
    root = tree(
        {
            "sys/class/powercap/intel-rapl:0/name": "package-0",
            "sys/class/powercap/intel-rapl:0/energy_uj": 123,
            "sys/class/powercap/intel-rapl:0/max_energy_range_uj": 262143328850,
            "sys/class/hwmon/hwmon2/name": "ina219",
            "sys/class/hwmon/hwmon2/power1_input": 2_000_000,
        }
    )
    ok = {s.name for s in detect_sensors(root) if s.ok}
    assert ok == {"rapl", "ina2xx-hwmon"}


@pytest.mark.skipif(Path("/sys/class/powercap").exists(), reason="this machine has RAPL")
def test_this_machine_has_no_rapl_and_says_why():
    rapl_status = next(s for s in detect_sensors("/") if s.name == "rapl")
    assert not rapl_status.ok
    assert rapl_status.reason.startswith("/sys/class/powercap does not exist: no RAPL powercap interface")


def test_package_imports_without_torch():
    code = (
        "import sys, edge_compress.profile, edge_compress.profile.energy as e\n"
        "e.detect_sensors('/nonexistent')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
