"""Jetson: INA3221 rails through hwmon (fake L4T 34+ tree) and tegrastats lines in both real formats."""

from __future__ import annotations

import sys
import time
from datetime import datetime

import pytest

from edge_compress.errors import DataError, UnknownNameError
from edge_compress.profile.energy.ina3221 import Ina3221Sensor, find_ina3221_rails
from edge_compress.profile.energy.tegrastats import TegrastatsSensor, parse_tegrastats, tegrastats_energy

HW = "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
ORIN = (
    "11-24-2026 10:00:01 RAM 2519/7620MB (lfb 5x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [12%@1510,5%@1510,3%@1510,0%@1510,off,off] EMC_FREQ 0% GR3D_FREQ 0% cpu@47.5C soc2@45.9C "
    "VDD_IN 4556mW/4556mW VDD_CPU_GPU_CV 498mW/498mW VDD_SOC 1435mW/1435mW"
)
NANO = (
    "RAM 2150/3956MB (lfb 100x4MB) SWAP 0/1978MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [8%@102,6%@102,3%@102,2%@102] EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 APE 25 PLL@26C CPU@29C "
    "PMIC@100C GPU@28.5C AO@35C thermal@28.75C POM_5V_IN 2963/2963 POM_5V_GPU 0/0 POM_5V_CPU 365/365"
)
XAVIER_NX = (
    "RAM 3110/7771MB (lfb 51x4MB) SWAP 0/3886MB (cached 0MB) CPU [2%@1190,1%@1190,0%@1190,0%@1190,off,off] "
    "EMC_FREQ 0% GR3D_FREQ 0% AO@32C GPU@32.5C PMIC@100C AUX@32C CPU@33.5C thermal@32.65C "
    "VDD_IN 4371/4408 VDD_CPU_GPU_CV 528/541 VDD_SOC 1355/1360"
)


def orin_tree(tree, vdd_in=(5080, 920)):
    return tree(
        {
            f"{HW}/name": "ina3221",
            f"{HW}/in1_label": "VDD_IN",
            f"{HW}/in1_input": vdd_in[0],
            f"{HW}/curr1_input": vdd_in[1],
            f"{HW}/in2_label": "VDD_CPU_GPU_CV",
            f"{HW}/in2_input": 5072,
            f"{HW}/curr2_input": 104,
            f"{HW}/in3_label": "VDD_SOC",
            f"{HW}/in3_input": 5064,
            f"{HW}/curr3_input": 288,
            f"{HW}/in7_label": "sum of shunt voltages",  # not a rail
            f"{HW}/in7_input": 1234,
        }
    )


def set_rail(root, mv, ma):
    (root / HW / "in1_input").write_text(f"{mv}\n")
    (root / HW / "curr1_input").write_text(f"{ma}\n")


def test_rails_found_by_label(tree):
    rails = find_ina3221_rails(orin_tree(tree))
    assert [(r.index, r.label) for r in rails] == [(1, "VDD_IN"), (2, "VDD_CPU_GPU_CV"), (3, "VDD_SOC")]


def test_ina3221_power_is_v_times_i(tree):
    sensor = Ina3221Sensor(orin_tree(tree), rail="VDD_SOC")
    ok, reason = sensor.available()
    assert ok and "VDD_SOC" in reason and "channel 3" in reason
    watts, resolution = sensor.read_power()
    assert watts == pytest.approx(5.064 * 0.288, rel=1e-12)
    assert resolution == pytest.approx((5064 + 288) * 1e-6, rel=1e-12)  # 1 mA * V + 1 mV * I


def test_ina3221_trapezoid_over_the_window_with_a_fake_clock(tree, fake_clock):
    root = orin_tree(tree, vdd_in=(5000, 1000))  # 5 W
    # a huge interval: the thread never samples, only start() and stop() do (each read stamped twice)
    sensor = Ina3221Sensor(root, interval_s=1000.0, clock=fake_clock(0.0, 0.0, 2.0, 2.0))
    sensor.start()
    set_rail(root, 5000, 2000)  # 10 W at the end
    r = sensor.stop()
    assert r.joules == 15.0 and r.window_s == 2.0 and r.mean_watts == 7.5
    assert (r.method, r.sample_count, r.sampling_hz) == ("ina3221-hwmon", 2, 0.5)
    # dt * max_step + max_resolution * window = 2 * 5 + (5000 + 2000) * 1e-6 * 2
    assert r.error_j == pytest.approx(10.0 + 0.014, rel=1e-12)
    assert [s.watts for s in sensor.samples] == [5.0, 10.0]


def test_ina3221_sampler_thread_constant_power(tree):
    sensor = Ina3221Sensor(orin_tree(tree, vdd_in=(5000, 800)), interval_s=0.001)  # 4 W
    sensor.start()
    time.sleep(0.05)
    r = sensor.stop()
    assert r.sample_count >= 10
    assert r.mean_watts == pytest.approx(4.0, rel=1e-12)
    assert r.joules == pytest.approx(4.0 * r.window_s, rel=1e-12)
    assert r.window_s == pytest.approx(sensor.samples[-1].t - sensor.samples[0].t)


def test_unknown_rail_lists_the_rails(tree):
    sensor = Ina3221Sensor(orin_tree(tree), rail="VDD_GPU_SOC")
    ok, reason = sensor.available()
    assert not ok
    assert "'VDD_GPU_SOC' not found" in reason and "['VDD_IN', 'VDD_CPU_GPU_CV', 'VDD_SOC']" in reason
    with pytest.raises(UnknownNameError, match="pass rail="):
        sensor.start()


def test_no_driver_folder_points_at_tegrastats(tmp_path):
    ok, reason = Ina3221Sensor(tmp_path).available()
    assert not ok and "ina3221 does not exist" in reason and "TegrastatsSensor" in reason


def test_malformed_hwmon_value_names_the_file(tree):
    root = orin_tree(tree, vdd_in=("5.0V", 900))
    ok, reason = Ina3221Sensor(root).available()
    assert not ok and f"{root / HW / 'in1_input'}: '5.0V' is not an integer" in reason


def test_parse_orin_line():
    line = parse_tegrastats(ORIN)
    assert line.timestamp == datetime(2026, 11, 24, 10, 0, 1)
    assert line.rails == {"VDD_IN": (4556, 4556), "VDD_CPU_GPU_CV": (498, 498), "VDD_SOC": (1435, 1435)}
    assert line.watts("VDD_IN") == 4.556


def test_parse_nano_and_xavier_lines_without_units():
    nano = parse_tegrastats(NANO)
    assert nano.timestamp is None
    assert nano.rails == {"POM_5V_IN": (2963, 2963), "POM_5V_GPU": (0, 0), "POM_5V_CPU": (365, 365)}
    nx = parse_tegrastats(XAVIER_NX)  # RAM/SWAP share the a/b shape but carry MB: not rails
    assert nx.rails == {"VDD_IN": (4371, 4408), "VDD_CPU_GPU_CV": (528, 541), "VDD_SOC": (1355, 1360)}


def test_tegrastats_errors_name_the_line_and_rails():
    with pytest.raises(DataError, match="no power rail"):
        parse_tegrastats("RAM 2519/7620MB (lfb 5x4MB) SWAP 0/3810MB (cached 0MB)")
    with pytest.raises(UnknownNameError, match=r"'VDD_IN' not in.*POM_5V_CPU"):
        parse_tegrastats(NANO).watts("VDD_IN")
    with pytest.raises(DataError, match="tegrastats line 2"):
        tegrastats_energy([ORIN, "garbage"], interval_s=0.1)


def test_tegrastats_log_energy():
    lines = [ORIN.replace("VDD_IN 4556mW/4556mW", f"VDD_IN {mw}mW/{mw}mW") for mw in (4000, 5000, 6000)]
    r = tegrastats_energy(lines + [""], rail="VDD_IN", interval_s=0.1)
    assert r.joules == pytest.approx(0.1 * 4.5 + 0.1 * 5.5, rel=1e-12)
    assert (r.method, r.sample_count, r.window_s) == ("tegrastats", 3, 0.2)
    assert r.error_j == pytest.approx(0.1 * 1.0 + 1e-3 * 0.2, rel=1e-12)


def test_tegrastats_sensor_reads_a_live_process():
    script = (
        "import sys, time\n"
        f"line = {ORIN.replace('4556mW/4556mW', '5000mW/4800mW')!r}\n"
        "while True:\n    print(line, flush=True); time.sleep(0.01)\n"
    )
    sensor = TegrastatsSensor(command=[sys.executable, "-S", "-c", script])
    assert sensor.available()[0]
    sensor.start()
    time.sleep(0.3)
    r = sensor.stop()
    assert r.sample_count >= 3
    assert r.mean_watts == pytest.approx(5.0, rel=1e-12)
    assert r.joules == pytest.approx(5.0 * r.window_s, rel=1e-12)


def test_missing_tegrastats_binary(tmp_path):
    ok, reason = TegrastatsSensor(root=tmp_path).available()
    assert not ok and "tegrastats not found" in reason and "L4T" in reason
