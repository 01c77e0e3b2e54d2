"""Which energy sensors this machine has, and why the others are not usable.

Every candidate answers through its own ``available()``, so the reasons are
the ones a user sees when asking that sensor directly. Android and the USB
meter cannot be discovered from sysfs: they are checked only when their
``adb_serial`` / ``meter_csv`` is given, and otherwise listed with how to
enable them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edge_compress.profile.energy.android import AndroidBatterySensor
from edge_compress.profile.energy.ina2xx import Ina2xxSensor, find_ina2xx
from edge_compress.profile.energy.ina3221 import Ina3221Sensor
from edge_compress.profile.energy.rapl import RaplSensor
from edge_compress.profile.energy.reading import Sensor
from edge_compress.profile.energy.tegrastats import TegrastatsSensor
from edge_compress.profile.energy.usb_meter import UsbMeterCsvSensor


@dataclass(frozen=True)
class SensorStatus:
    """One candidate sensor: usable or not, and the reason either way."""

    name: str
    ok: bool
    reason: str
    sensor: Sensor | None


def detect_sensors(
    root: str | Path = "/",
    *,
    adb_serial: str | None = None,
    meter_csv: str | Path | None = None,
) -> list[SensorStatus]:
    """Every candidate sensor with its status; ``[s.sensor for s in result if s.ok]`` are the usable ones."""
    candidates: list[Sensor] = [RaplSensor(root), Ina3221Sensor(root)]
    chips = find_ina2xx(root)
    candidates += [Ina2xxSensor(root, hwmon=d.name) for d in chips] or [Ina2xxSensor(root)]
    candidates.append(TegrastatsSensor(root=root))
    statuses = [_status(s) for s in candidates]
    statuses.append(_android(adb_serial))
    statuses.append(_meter(meter_csv))
    return statuses


def _status(sensor: Sensor) -> SensorStatus:
    ok, reason = sensor.available()
    return SensorStatus(sensor.name, ok, reason, sensor)


def _android(serial: str | None) -> SensorStatus:
    if serial is None:
        reason = "not checked: pass adb_serial= (see `adb devices`) to read an Android phone's battery"
        return SensorStatus("android-battery", False, reason, None)
    return _status(AndroidBatterySensor(serial))


def _meter(csv_path: str | Path | None) -> SensorStatus:
    if csv_path is None:
        reason = "not checked: pass meter_csv= with the file an external USB power meter logs to"
        return SensorStatus("usb-meter-csv", False, reason, None)
    return _status(UsbMeterCsvSensor(csv_path))
