"""An Android phone's battery current x voltage, read over ADB.

``/sys/class/power_supply/battery/current_now`` is in microamps and
``voltage_now`` in microvolts. The sign of the current is vendor-specific:
the kernel documents negative = discharging since 2020 (commit 05f94eb98907,
"power: supply: document current direction", which lists the three habits
in the field: negative when discharging, positive when discharging, always
positive), and Android's BatteryManager follows it, but many fuel-gauge drivers
report the opposite. ``sign="auto"`` therefore uses the magnitude and relies on
``status`` saying ``Discharging``; ``"negative-discharging"`` or
``"positive-discharging"`` pin the convention and refuse a current of the other
sign. A charging phone measures charger minus load, not the load, so any
status other than ``Discharging`` is refused: unplug and use wireless ADB
(``adb tcpip 5555``, ``adb connect PHONE:5555``).

Fuel gauges refresh ``current_now`` on their own schedule (often every 0.1-1
s, some slower) and an ADB round trip takes tens of milliseconds: windows of
several seconds are needed for a meaningful number.
"""

from __future__ import annotations

import subprocess
import time
from typing import Callable

from edge_compress.errors import BackendUnavailableError, ConfigError, DataError, EdgeCompressError
from edge_compress.profile.energy.sampler import SampledSensor

SIGN_CONVENTIONS = ("auto", "negative-discharging", "positive-discharging")
Shell = Callable[[str], str]


def adb_shell(serial: str | None = None, *, timeout_s: float = 10.0) -> Shell:
    """A function that runs one command with ``adb [-s SERIAL] shell`` and returns its stdout."""
    prefix = ["adb", *(["-s", serial] if serial else []), "shell"]

    def run(command: str) -> str:
        try:
            done = subprocess.run([*prefix, command], capture_output=True, text=True, timeout=timeout_s)
        except FileNotFoundError:
            raise BackendUnavailableError(
                "adb not found on PATH; install Android platform-tools (apt install adb) and enable USB debugging"
            ) from None
        if done.returncode != 0:
            raise DataError(f"`{' '.join(prefix)} {command}` failed (exit {done.returncode}): {done.stderr.strip()}")
        return done.stdout

    return run


def parse_battery(text: str, supply_dir: str) -> tuple[int, int, str]:
    """``current_now`` (uA), ``voltage_now`` (uV) and ``status`` from ``cat`` of the three files, in that order."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if len(lines) != 3:
        raise DataError(
            f"{supply_dir}: expected 3 lines (current_now, voltage_now, status), got {len(lines)}: {text.strip()[:200]!r}"
        )
    values = []
    for name, value in zip(("current_now", "voltage_now"), lines[:2]):
        try:
            values.append(int(value))
        except ValueError:
            raise DataError(f"{supply_dir}/{name}: {value!r} is not an integer (microamps / microvolts)") from None
    return values[0], values[1], lines[2]


def discharge_watts(current_ua: int, voltage_uv: int, status: str, sign: str, supply_dir: str) -> float:
    """The power drawn from the battery, refusing a charging battery or a current of the wrong sign."""
    if status != "Discharging":
        raise DataError(
            f"{supply_dir}/status is {status!r}: the battery is not discharging, so its current is not the "
            "load; unplug the phone and use wireless ADB (adb tcpip 5555; adb connect PHONE:5555)"
        )
    if sign == "negative-discharging":
        current_ua = -current_ua
    if sign != "auto" and current_ua < 0:
        raise DataError(
            f"{supply_dir}/current_now has the charging sign under sign={sign!r} while status is Discharging; "
            "this vendor uses the other convention: pass sign='auto' or the opposite convention"
        )
    return abs(current_ua) * 1e-6 * voltage_uv * 1e-6


class AndroidBatterySensor(SampledSensor):
    """Battery power of an Android device, one ``cat`` over ADB per sample.

    ``shell`` runs one command on the device (default: ``adb_shell(serial)``);
    tests pass a fake. ``current_unit_a`` converts ``current_now`` to amps:
    a few vendors report milliamps instead of microamps (pass ``1e-3``).
    """

    name = "android-battery"
    method = "android-battery"

    def __init__(
        self,
        serial: str | None = None,
        *,
        shell: Shell | None = None,
        sign: str = "auto",
        supply: str = "battery",
        interval_s: float = 0.25,
        current_unit_a: float = 1e-6,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if sign not in SIGN_CONVENTIONS:
            raise ConfigError(f"android sign={sign!r}; choices: {', '.join(SIGN_CONVENTIONS)}")
        super().__init__(interval_s, clock=clock)
        self.serial, self.sign, self.current_unit_a = serial, sign, current_unit_a
        self.supply_dir = f"/sys/class/power_supply/{supply}"
        self._shell = shell or adb_shell(serial)

    def available(self) -> tuple[bool, str]:
        try:
            watts, _ = self.read_power()
        except EdgeCompressError as err:
            return False, str(err)
        return True, f"{self.supply_dir} on {self.serial or 'the only ADB device'} reads {watts:.3f} W"

    def read_power(self) -> tuple[float, float]:
        d = self.supply_dir
        current, voltage, status = parse_battery(self._shell(f"cat {d}/current_now {d}/voltage_now {d}/status"), d)
        current_ua = round(current * self.current_unit_a * 1e6)
        watts = discharge_watts(current_ua, voltage, status, self.sign, d)
        # resolution of the reporting units: one current unit * V + 1 uV * I
        return watts, self.current_unit_a * abs(voltage) * 1e-6 + abs(current_ua) * 1e-12
