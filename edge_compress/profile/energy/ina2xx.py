"""INA219 / INA226 (and siblings) on a Raspberry Pi through the Linux ``ina2xx`` hwmon driver.

With the chip declared in the device tree (``dtoverlay=i2c-sensor,ina219``
or ``ina226``), the driver shows (kernel Documentation/hwmon/ina2xx.rst)::

    /sys/class/hwmon/hwmonN/name           "ina219"
    /sys/class/hwmon/hwmonN/power1_input   power, uW
    /sys/class/hwmon/hwmonN/in1_input      bus voltage, mV
    /sys/class/hwmon/hwmonN/curr1_input    current, mA

``power1_input`` is computed by the chip and preferred; without it the
sensor falls back to V * I. The reported microwatt is finer than the chip's
power LSB (20x the current LSB on the INA219, 25x on the INA226, set by the
driver from the shunt resistor): pass that LSB as ``min_resolution_w`` for an
honest error bound.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from edge_compress.errors import EdgeCompressError, UnknownNameError
from edge_compress.profile.energy import _sysfs
from edge_compress.profile.energy.ina3221 import vi_watts
from edge_compress.profile.energy.sampler import SampledSensor

HWMON = "sys/class/hwmon"
INA2XX_CHIPS = ("ina219", "ina220", "ina226", "ina230", "ina231", "ina260")


def find_ina2xx(root: str | Path = "/") -> list[Path]:
    """Every hwmon folder under ``root`` whose ``name`` is a chip the ina2xx driver serves."""
    found = []
    for hwmon in sorted((Path(root) / HWMON).glob("hwmon*")):
        try:
            if _sysfs.read_sysfs(hwmon / "name") in INA2XX_CHIPS:
                found.append(hwmon)
        except OSError:
            continue
    return found


class Ina2xxSensor(SampledSensor):
    """The power one INA2xx chip reports, sampled every ``interval_s``.

    ``hwmon`` picks the chip by folder name (``"hwmon2"``) when there are
    several; with one chip it may stay ``None``.
    """

    name = "ina2xx-hwmon"
    method = "ina2xx-hwmon"

    def __init__(
        self,
        root: str | Path = "/",
        *,
        hwmon: str | None = None,
        interval_s: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
        min_resolution_w: float = 0.0,
    ) -> None:
        super().__init__(interval_s, clock=clock, min_resolution_w=min_resolution_w)
        self.root, self.hwmon = Path(root), hwmon
        self._dir: Path | None = None

    def device(self) -> Path:
        """The chip's hwmon folder; none, several without ``hwmon=``, or a wrong name raise with the choices."""
        base = self.root / HWMON
        chips = find_ina2xx(self.root)
        if not chips:
            raise UnknownNameError(
                f"no INA2xx chip ({', '.join(INA2XX_CHIPS)}) under {base}: wire one to I2C and load the "
                "driver with dtoverlay=i2c-sensor,ina219 (or ina226) in the Pi's config.txt"
            )
        if self.hwmon is None and len(chips) == 1:
            return chips[0]
        for d in chips:
            if d.name == self.hwmon:
                return d
        names = [f"{d.name} ({_sysfs.read_sysfs(d / 'name')})" for d in chips]
        raise UnknownNameError(f"ina2xx hwmon={self.hwmon!r}: INA2xx chips under {base}: {names}; pass hwmon= with one of them")

    def available(self) -> tuple[bool, str]:
        try:
            self._dir = self.device()
            watts, _ = self.read_power()
        except OSError as err:
            return False, _sysfs.unreadable_reason(getattr(err, "filename", self.root / HWMON), err)
        except EdgeCompressError as err:
            return False, str(err)
        chip = _sysfs.read_sysfs(self._dir / "name")
        return True, f"{chip} at {self._dir} reads {watts:.3f} W"

    def start(self) -> None:
        self._dir = self.device()
        super().start()

    def read_power(self) -> tuple[float, float]:
        d = self._dir or self.device()
        if (d / "power1_input").exists():
            return _sysfs.read_int(d / "power1_input") / 1e6, 1e-6
        return vi_watts(_sysfs.read_int(d / "in1_input"), _sysfs.read_int(d / "curr1_input"))
