"""Android battery over ADB: a fake shell with both current sign conventions."""

from __future__ import annotations

import pytest

from edge_compress.errors import BackendUnavailableError, ConfigError, DataError
from edge_compress.profile.energy.android import AndroidBatterySensor, adb_shell

BAT = "/sys/class/power_supply/battery"
CMD = f"cat {BAT}/current_now {BAT}/voltage_now {BAT}/status"


class FakeAdb:
    """Answers the battery ``cat`` with the next scripted (current_now, voltage_now, status)."""

    def __init__(self, *readings):
        self.readings, self.commands = list(readings), []

    def __call__(self, command: str) -> str:
        self.commands.append(command)
        current, voltage, status = self.readings.pop(0) if len(self.readings) > 1 else self.readings[0]
        return f"{current}\n{voltage}\n{status}\n"


WATTS = 0.812 * 3.987  # 812 mA at 3.987 V


@pytest.mark.parametrize(
    ("current", "sign"),
    [
        (-812000, "auto"),  # kernel ABI / Pixel: negative while discharging
        (812000, "auto"),  # many vendor fuel gauges: positive while discharging
        (-812000, "negative-discharging"),
        (812000, "positive-discharging"),
    ],
)
def test_both_sign_conventions_give_the_same_power(current, sign):
    shell = FakeAdb((current, 3987000, "Discharging"))
    sensor = AndroidBatterySensor("R58M123ABC", shell=shell, sign=sign)
    watts, resolution = sensor.read_power()
    assert watts == pytest.approx(WATTS, rel=1e-12)
    assert resolution == pytest.approx(1e-6 * 3.987 + 0.812e-6, rel=1e-9)
    assert shell.commands == [CMD]


def test_pinned_convention_refuses_the_other_sign():
    sensor = AndroidBatterySensor(shell=FakeAdb((812000, 3987000, "Discharging")), sign="negative-discharging")
    with pytest.raises(DataError, match=r"current_now has the charging sign under sign='negative-discharging'"):
        sensor.read_power()


def test_charging_phone_is_refused():
    sensor = AndroidBatterySensor(shell=FakeAdb((1500000, 4300000, "Charging")))
    ok, reason = sensor.available()
    assert not ok and f"{BAT}/status is 'Charging'" in reason and "wireless ADB" in reason


def test_integration_over_scripted_readings(fake_clock):
    shell = FakeAdb((-500000, 4000000, "Discharging"), (-1000000, 4000000, "Discharging"))  # 2 W then 4 W
    sensor = AndroidBatterySensor(shell=shell, interval_s=1000.0, clock=fake_clock(0.0, 0.0, 3.0, 3.0))
    sensor.start()
    r = sensor.stop()
    assert r.joules == 9.0 and r.mean_watts == 3.0 and r.method == "android-battery"


def test_milliamp_vendors():
    sensor = AndroidBatterySensor(shell=FakeAdb((-812, 3987000, "Discharging")), current_unit_a=1e-3)
    assert sensor.read_power()[0] == pytest.approx(WATTS, rel=1e-12)


def test_malformed_output_names_the_field():
    sensor = AndroidBatterySensor(shell=FakeAdb(("cat: No such file", 3987000, "Discharging")))
    with pytest.raises(DataError, match=r"battery/current_now: 'cat: No such file' is not an integer"):
        sensor.read_power()
    short = AndroidBatterySensor(shell=lambda cmd: "812000\n")
    with pytest.raises(DataError, match="expected 3 lines"):
        short.read_power()


def test_unknown_sign_convention():
    with pytest.raises(ConfigError, match="choices: auto, negative-discharging, positive-discharging"):
        AndroidBatterySensor(shell=FakeAdb((0, 0, "Discharging")), sign="negative")


def test_real_shell_without_adb(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackendUnavailableError, match="adb not found on PATH"):
        adb_shell("R58M123ABC")("true")
    ok, reason = AndroidBatterySensor("R58M123ABC").available()
    assert not ok and "platform-tools" in reason


def test_real_shell_builds_the_adb_command(tmp_path, monkeypatch):
    fake = tmp_path / "adb"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert adb_shell("R58M123ABC")("cat x") == "-s R58M123ABC shell cat x\n"
    assert adb_shell()("cat x") == "shell cat x\n"
