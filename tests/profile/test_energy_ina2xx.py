"""INA219 / INA226 on a Raspberry Pi through the ina2xx hwmon driver: fake /sys/class/hwmon trees."""

from __future__ import annotations

import pytest

from edge_compress.errors import UnknownNameError
from edge_compress.profile.energy.ina2xx import Ina2xxSensor, find_ina2xx

HW = "sys/class/hwmon"


def pi_tree(tree, **extra):
    files = {
        f"{HW}/hwmon0/name": "cpu_thermal",
        f"{HW}/hwmon0/temp1_input": 48312,
        f"{HW}/hwmon1/name": "ina219",
        f"{HW}/hwmon1/in0_input": 12,  # shunt voltage, mV: not the bus voltage
        f"{HW}/hwmon1/in1_input": 5000,
        f"{HW}/hwmon1/curr1_input": 500,
        f"{HW}/hwmon1/power1_input": 2_500_000,  # uW
    }
    return tree({**files, **extra})


def test_only_ina_chips_are_found(tree):
    assert [d.name for d in find_ina2xx(pi_tree(tree))] == ["hwmon1"]


def test_power1_input_is_preferred_and_integrated(tree, fake_clock):
    root = pi_tree(tree)
    sensor = Ina2xxSensor(root, interval_s=1000.0, clock=fake_clock(0.0, 0.0, 1.0, 1.0))
    ok, reason = sensor.available()
    assert ok and reason == f"ina219 at {root / HW / 'hwmon1'} reads 2.500 W"
    sensor.start()
    (root / HW / "hwmon1/power1_input").write_text("3500000\n")
    r = sensor.stop()
    assert r.joules == 3.0 and r.mean_watts == 3.0
    assert r.method == "ina2xx-hwmon" and r.measured
    assert r.error_j == pytest.approx(1.0 * 1.0 + 1e-6 * 1.0, rel=1e-12)


def test_voltage_times_current_without_power1_input(tree):
    root = tree(
        {f"{HW}/hwmon4/name": "ina226", f"{HW}/hwmon4/in1_input": 5100, f"{HW}/hwmon4/curr1_input": 400}
    )
    watts, resolution = Ina2xxSensor(root).read_power()
    assert watts == pytest.approx(2.04, rel=1e-12)
    assert resolution == pytest.approx(5.5e-3, rel=1e-12)


def test_chip_lsb_raises_the_resolution(tree):
    sensor = Ina2xxSensor(pi_tree(tree), min_resolution_w=0.002)
    assert sensor.sample().resolution_w == 0.002


def test_two_chips_need_a_choice(tree):
    root = pi_tree(tree, **{f"{HW}/hwmon2/name": "ina226", f"{HW}/hwmon2/power1_input": 1_200_000})
    ok, reason = Ina2xxSensor(root).available()
    assert not ok and "['hwmon1 (ina219)', 'hwmon2 (ina226)']" in reason and "pass hwmon=" in reason
    assert Ina2xxSensor(root, hwmon="hwmon2").read_power()[0] == 1.2
    with pytest.raises(UnknownNameError, match="hwmon='hwmon9'"):
        Ina2xxSensor(root, hwmon="hwmon9").device()


def test_no_chip_says_how_to_load_one(tmp_path):
    ok, reason = Ina2xxSensor(tmp_path).available()
    assert not ok and "no INA2xx chip" in reason and "dtoverlay=i2c-sensor,ina219" in reason
