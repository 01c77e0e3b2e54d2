"""RAPL through powercap: fake sysfs trees, counter wrap-around, permission denied."""

from __future__ import annotations

import time

import pytest

from edge_compress.errors import UnknownNameError
from edge_compress.profile.energy import _sysfs
from edge_compress.profile.energy.rapl import RAPL_UNIT_J, RaplSensor, counter_delta_uj, find_rapl_zones
from edge_compress.profile.energy.reading import Sensor

RANGE = 262143328850  # max_energy_range_uj of a real Intel package zone
PC = "sys/class/powercap"


def rapl_tree(tree, pkg0=1_000_000, pkg1=5_000_000, dram=300_000):
    return tree(
        {
            f"{PC}/intel-rapl/enabled": 1,  # the control-type folder: no energy_uj, must be skipped
            f"{PC}/intel-rapl:0/name": "package-0",
            f"{PC}/intel-rapl:0/energy_uj": pkg0,
            f"{PC}/intel-rapl:0/max_energy_range_uj": RANGE,
            f"{PC}/intel-rapl:0:0/name": "core",
            f"{PC}/intel-rapl:0:0/energy_uj": 10,
            f"{PC}/intel-rapl:0:0/max_energy_range_uj": RANGE,
            f"{PC}/intel-rapl:0:1/name": "dram",
            f"{PC}/intel-rapl:0:1/energy_uj": dram,
            f"{PC}/intel-rapl:0:1/max_energy_range_uj": RANGE,
            f"{PC}/intel-rapl:1/name": "package-1",
            f"{PC}/intel-rapl:1/energy_uj": pkg1,
            f"{PC}/intel-rapl:1/max_energy_range_uj": RANGE,
        }
    )


def set_uj(root, zone, value):
    (root / PC / zone / "energy_uj").write_text(f"{value}\n")


def test_zones_found_and_control_folder_skipped(tree):
    root = rapl_tree(tree)
    zones = find_rapl_zones(root)
    assert [(z.path.name, z.name, z.top_level) for z in zones] == [
        ("intel-rapl:0", "package-0", True),
        ("intel-rapl:0:0", "core", False),
        ("intel-rapl:0:1", "dram", False),
        ("intel-rapl:1", "package-1", True),
    ]
    assert all(z.max_range_uj == RANGE for z in zones)


def test_default_sums_both_packages_over_the_window(tree, fake_clock):
    root = rapl_tree(tree)
    sensor = RaplSensor(root, poll_s=None, clock=fake_clock(10.0, 12.0))
    assert isinstance(sensor, Sensor)
    assert sensor.available() == (True, "RAPL zones package-0 (intel-rapl:0), package-1 (intel-rapl:1)")
    sensor.start()
    set_uj(root, "intel-rapl:0", 1_000_000 + 7_000_000)  # 7 J
    set_uj(root, "intel-rapl:1", 5_000_000 + 3_000_000)  # 3 J
    set_uj(root, "intel-rapl:0:0", 6_000_000)  # a subzone: inside package-0, not added again
    r = sensor.stop()
    assert r.joules == 10.0
    assert r.window_s == 2.0 and r.mean_watts == 5.0
    assert (r.method, r.measured, r.kind, r.sample_count, r.sampling_hz) == ("rapl", True, "measured", 2, 1000.0)
    # two zones quantised at each end + one counter update period at each edge
    assert r.error_j == pytest.approx(2 * 2 * RAPL_UNIT_J + 2 * 1e-3 * 5.0, rel=1e-12)


def test_counter_wraparound(tree, fake_clock):
    assert counter_delta_uj(RANGE - 500_000, 1_500_000, RANGE) == 2_000_000
    assert counter_delta_uj(100, 400, RANGE) == 300
    root = rapl_tree(tree, pkg0=RANGE - 500_000)
    sensor = RaplSensor(root, domains=["package-0"], poll_s=None, clock=fake_clock(0.0, 1.0))
    sensor.start()
    set_uj(root, "intel-rapl:0", 1_500_000)
    assert sensor.stop().joules == 2.0


def test_polling_catches_two_wraps_a_single_difference_would_miss(tree, fake_clock):
    root = rapl_tree(tree, pkg0=int(0.9 * RANGE))
    sensor = RaplSensor(root, domains=["package-0"], poll_s=None, clock=fake_clock(0.0, 100.0))
    sensor.start()
    for value in (int(0.1 * RANGE), int(0.8 * RANGE)):
        set_uj(root, "intel-rapl:0", value)
        sensor.poll()
    set_uj(root, "intel-rapl:0", int(0.05 * RANGE))
    r = sensor.stop()
    expected_uj = (RANGE - int(0.9 * RANGE) + int(0.1 * RANGE)) + (int(0.8 * RANGE) - int(0.1 * RANGE))
    expected_uj += RANGE - int(0.8 * RANGE) + int(0.05 * RANGE)
    assert r.joules == expected_uj / 1e6
    assert r.sample_count == 4


def test_domains_pick_zones_by_name_and_a_miss_lists_them(tree, fake_clock):
    root = rapl_tree(tree)
    sensor = RaplSensor(root, domains=("package-0", "dram"), poll_s=None, clock=fake_clock(0.0, 1.0))
    sensor.start()
    set_uj(root, "intel-rapl:0", 3_000_000)  # +2 J
    set_uj(root, "intel-rapl:0:1", 800_000)  # +0.5 J
    assert sensor.stop().joules == 2.5
    bad = RaplSensor(root, domains=["psys"])
    with pytest.raises(UnknownNameError, match=r"psys.*core.*dram.*package-0.*package-1.*pass domains="):
        bad.zones()
    ok, reason = bad.available()
    assert not ok and "'psys'" in reason


def test_poll_thread_runs_and_stops(tree):
    root = rapl_tree(tree)
    sensor = RaplSensor(root, poll_s=0.001)
    sensor.start()
    set_uj(root, "intel-rapl:0", 2_000_000)
    time.sleep(0.02)
    r = sensor.stop()
    assert r.joules == 1.0 and r.sample_count > 2
    assert sensor._thread is None


def test_permission_denied_tells_the_user_what_to_do(tree, monkeypatch):
    """Tests run as root here (chmod 000 would not stop a read), so the read itself is made to fail."""
    root = rapl_tree(tree)
    real = _sysfs.read_sysfs

    def denied(path):
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(_sysfs, "read_sysfs", denied)
    ok, reason = RaplSensor(root).available()
    assert not ok
    assert f"{root / PC}/intel-rapl:0/energy_uj" in reason
    for words in ("permission denied", "root", "chmod o+r", "CVE-2020-8694"):
        assert words in reason


def test_missing_powercap_is_unavailable_with_a_reason(tmp_path):
    ok, reason = RaplSensor(tmp_path).available()
    assert not ok
    assert reason.startswith(f"{tmp_path / PC} does not exist: no RAPL powercap interface")
    assert "modprobe intel_rapl_msr" in reason


def test_garbage_in_energy_uj_names_the_file(tree):
    root = rapl_tree(tree, pkg0="n/a")
    ok, reason = RaplSensor(root).available()
    assert not ok and "intel-rapl:0/energy_uj: 'n/a' is not an integer" in reason
