"""Jetson power rails from the INA3221 monitor through the Linux hwmon driver (L4T 34+, JetPack 5/6).

Layout (kernel Documentation/hwmon/ina3221.rst)::

    /sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1/in1_label    "VDD_IN"
    /sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1/in1_input    bus voltage, mV
    /sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon1/curr1_input  current, mA

Channels 1-3 carry the rails (Orin Nano: VDD_IN, VDD_CPU_GPU_CV, VDD_SOC;
AGX Orin has a second chip at 1-0041). ``VDD_IN`` is the whole module's input,
the default. The chip measures but does not multiply: power is V * I, sampled
and integrated by ``SampledSensor``. L4T 32 (JetPack 4) exposes the rails under
``ina3221x/*/iio:device*`` instead; use ``TegrastatsSensor`` there.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_compress.errors import EdgeCompressError, UnknownNameError
from edge_compress.profile.energy import _sysfs
from edge_compress.profile.energy.sampler import SampledSensor

INA3221_DRIVER = "sys/bus/i2c/drivers/ina3221"
_LABEL = re.compile(r"^in([123])_label$")


@dataclass(frozen=True)
class RailChannel:
    """One INA3221 channel: the hwmon folder, the channel number (1-3) and its rail label."""

    hwmon: Path
    index: int
    label: str

    @property
    def voltage_path(self) -> Path:
        return self.hwmon / f"in{self.index}_input"

    @property
    def current_path(self) -> Path:
        return self.hwmon / f"curr{self.index}_input"


def find_ina3221_rails(root: str | Path = "/") -> list[RailChannel]:
    """Every labelled INA3221 channel with a current reading, across all chips under ``root``."""
    rails = []
    for hwmon in sorted((Path(root) / INA3221_DRIVER).glob("*/hwmon/hwmon*")):
        for label_file in sorted(hwmon.glob("in*_label")):
            match = _LABEL.match(label_file.name)
            if match and (hwmon / f"curr{match[1]}_input").exists():
                rails.append(RailChannel(hwmon, int(match[1]), _sysfs.read_sysfs(label_file)))
    return rails


def vi_watts(millivolts: int, milliamps: int) -> tuple[float, float]:
    """P = V * I from hwmon's mV and mA, and its resolution: 1 mA * V + 1 mV * I (the reporting units)."""
    watts = millivolts * milliamps / 1e6
    return watts, (abs(millivolts) + abs(milliamps)) * 1e-6


class Ina3221Sensor(SampledSensor):
    """One Jetson rail (``rail``, default ``"VDD_IN"``) sampled every ``interval_s``."""

    name = "ina3221-hwmon"
    method = "ina3221-hwmon"

    def __init__(
        self,
        root: str | Path = "/",
        *,
        rail: str = "VDD_IN",
        interval_s: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
        min_resolution_w: float = 0.0,
    ) -> None:
        super().__init__(interval_s, clock=clock, min_resolution_w=min_resolution_w)
        self.root, self.rail = Path(root), rail
        self._channel: RailChannel | None = None

    def channel(self) -> RailChannel:
        """The channel labelled ``rail``; a miss lists the rails that exist."""
        rails = find_ina3221_rails(self.root)
        for ch in rails:
            if ch.label == self.rail:
                return ch
        raise UnknownNameError(
            f"INA3221 rail {self.rail!r} not found under {self.root / INA3221_DRIVER}; rails here: "
            f"{[ch.label for ch in rails] or 'none'}; pass rail= with one of them"
        )

    def available(self) -> tuple[bool, str]:
        driver = self.root / INA3221_DRIVER
        if not driver.is_dir():
            return False, (
                f"{driver} does not exist: not a Jetson on L4T 34+ (JetPack 5/6); on L4T 32 the rails "
                "are under ina3221x/*/iio:device*, use TegrastatsSensor there"
            )
        try:
            ch = self.channel()
            self._channel = ch
            watts, _ = self.read_power()
        except OSError as err:
            return False, _sysfs.unreadable_reason(getattr(err, "filename", driver), err)
        except EdgeCompressError as err:
            return False, str(err)
        return True, f"INA3221 rail {ch.label} ({ch.hwmon}, channel {ch.index}) reads {watts:.3f} W"

    def start(self) -> None:
        self._channel = self.channel()
        super().start()

    def read_power(self) -> tuple[float, float]:
        ch = self._channel or self.channel()
        return vi_watts(_sysfs.read_int(ch.voltage_path), _sysfs.read_int(ch.current_path))
