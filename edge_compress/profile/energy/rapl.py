"""Intel and AMD RAPL energy counters through the Linux powercap interface.

Layout (Documentation/power/powercap/powercap.rst)::

    /sys/class/powercap/intel-rapl:0/{name,energy_uj,max_energy_range_uj}      name "package-0"
    /sys/class/powercap/intel-rapl:0:0/...                                     name "core", "uncore", "dram"
    /sys/class/powercap/intel-rapl:1/...                                       name "psys" on some laptops

AMD Zen CPUs are served by the same ``intel_rapl_msr`` driver and appear under
the same names. ``energy_uj`` is a running counter in microjoules that wraps to
zero after ``max_energy_range_uj``; a window is the difference of two reads.
By default the sensor sums the top-level ``package-*`` zones: subzones are
already inside their package (except ``dram`` on some servers: add it with
``domains=("package-0", "dram")``), and ``psys`` contains the packages.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from edge_compress.errors import EdgeCompressError, UnknownNameError
from edge_compress.profile.energy import _sysfs
from edge_compress.profile.energy.reading import EnergyReading, counter_error_j

POWERCAP = "sys/class/powercap"
# The Energy Status Unit of MSR_RAPL_POWER_UNIT: Intel's default is 2^-14 J
# (61 uJ, Intel SDM vol. 3B, 15.10.1), AMD Zen's 2^-16 J (15.3 uJ). sysfs only
# shows microjoules, so the coarser Intel unit is the safe bound.
RAPL_UNIT_J = 2.0**-14
RAPL_UPDATE_S = 1e-3  # the counters update about every millisecond (same SDM section)
_ZONE_DIR = re.compile(r"^intel-rapl:\d+(:\d+)?$")
_PERMISSION_HINT = (
    "since the November 2020 fix for CVE-2020-8694 (PLATYPUS power side channel) energy_uj is readable "
    "by root only: run as root, or grant read access until the next boot with "
    "`sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj`"
)


@dataclass(frozen=True)
class RaplZone:
    """One powercap zone: its folder, its ``name`` and the counter's wrap range."""

    path: Path
    name: str
    max_range_uj: int

    @property
    def top_level(self) -> bool:
        return self.path.name.count(":") == 1


def find_rapl_zones(root: str | Path = "/") -> list[RaplZone]:
    """Every ``intel-rapl:N`` and ``intel-rapl:N:M`` zone under ``root`` that has an energy counter."""
    base = Path(root) / POWERCAP
    if not base.is_dir():
        return []
    dirs = sorted(d for d in base.iterdir() if _ZONE_DIR.match(d.name) and (d / "energy_uj").exists())
    return [RaplZone(d, _sysfs.read_sysfs(d / "name"), _sysfs.read_int(d / "max_energy_range_uj")) for d in dirs]


def counter_delta_uj(before: int, after: int, max_range_uj: int) -> int:
    """Energy between two reads of a counter that wraps to 0 after ``max_range_uj``.

    A smaller second read means one wrap happened. Two wraps cannot be told
    from one, which is why ``RaplSensor`` reads the counter every ``poll_s``.
    """
    if after >= before:
        return after - before
    return after + max_range_uj - before


class RaplSensor:
    """Energy of the selected RAPL domains over a window (``method="rapl"``).

    ``domains`` are zone names (``"package-0"``, ``"dram"``, ``"core"``);
    ``None`` takes every top-level ``package-*`` zone. A background thread reads
    the counters every ``poll_s`` so that a long window cannot hide two wraps
    (a 262 kJ range wraps after about 20 minutes at 200 W); ``None`` disables it.
    """

    name = "rapl"
    kind = "measured"
    method = "rapl"

    def __init__(
        self,
        root: str | Path = "/",
        *,
        domains: Sequence[str] | None = None,
        poll_s: float | None = 60.0,
        unit_j: float = RAPL_UNIT_J,
        update_s: float = RAPL_UPDATE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = Path(root)
        self.domains = tuple(domains) if domains is not None else None
        self.poll_s, self.unit_j, self.update_s = poll_s, unit_j, update_s
        self._clock = clock
        self._lock = threading.Lock()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._zones: list[RaplZone] = []
        self._last: list[int] = []
        self._total_uj: list[int] = []
        self._reads = 0
        self._t0 = 0.0

    def zones(self) -> list[RaplZone]:
        """The zones this sensor sums; an unknown domain name lists the zones that exist."""
        found = find_rapl_zones(self.root)
        if self.domains is None:
            return [z for z in found if z.top_level and z.name.startswith("package")]
        by_name = {z.name: z for z in found}
        missing = [d for d in self.domains if d not in by_name]
        if missing:
            raise UnknownNameError(
                f"RAPL domain(s) {missing} not found under {self.root / POWERCAP}; zones here: "
                f"{sorted(by_name) or 'none'}; pass domains= with names from that list"
            )
        return [by_name[d] for d in self.domains]

    def available(self) -> tuple[bool, str]:
        base = self.root / POWERCAP
        if not base.is_dir():
            return False, (
                f"{base} does not exist: no RAPL powercap interface on this machine (not an Intel/AMD "
                "x86 CPU, a VM or container that hides it, or the intel_rapl_msr module is not loaded: "
                "try `sudo modprobe intel_rapl_msr`)"
            )
        try:
            zones = self.zones()
        except (UnknownNameError, OSError, EdgeCompressError) as err:
            return False, str(err)
        if not zones:
            return False, f"no intel-rapl:N zone named package-* under {base}; pass domains= to pick zones"
        return self._readable(zones)

    def _readable(self, zones: list[RaplZone]) -> tuple[bool, str]:
        for zone in zones:
            path = zone.path / "energy_uj"
            try:
                _sysfs.read_int(path)
            except PermissionError:
                return False, f"cannot read {path}: permission denied; {_PERMISSION_HINT}"
            except OSError as err:
                return False, _sysfs.unreadable_reason(path, err)
            except EdgeCompressError as err:
                return False, str(err)
        return True, "RAPL zones " + ", ".join(f"{z.name} ({z.path.name})" for z in zones)

    def start(self) -> None:
        if self._thread is not None or self._zones:
            raise EdgeCompressError("rapl: start() called twice; call stop() to close the open window first")
        zones = self.zones()
        if not zones:
            raise UnknownNameError(f"no RAPL package-* zone under {self.root / POWERCAP}; check available() first")
        self._zones = zones
        self._t0 = self._clock()
        self._last = self._read_all()
        self._total_uj = [0] * len(self._zones)
        self._reads = 1
        if self.poll_s is not None:
            self._halt.clear()
            self._thread = threading.Thread(target=self._poll_loop, name="rapl-poll", daemon=True)
            self._thread.start()

    def stop(self) -> EnergyReading:
        if not self._zones:
            raise EdgeCompressError("rapl: stop() without start(); call start() before the workload")
        if self._thread is not None:
            self._halt.set()
            self._thread.join()
            self._thread = None
        self.poll()
        window = self._clock() - self._t0
        joules = sum(self._total_uj) / 1e6
        n_zones, self._zones = len(self._zones), []
        mean = joules / window if window > 0 else 0.0
        error = counter_error_j(self.unit_j * n_zones, self.update_s, mean)
        return EnergyReading(joules, window, mean, self._reads, 1.0 / self.update_s, "rapl", error, True)

    def _read_all(self) -> list[int]:
        return [_sysfs.read_int(z.path / "energy_uj") for z in self._zones]

    def poll(self) -> None:
        """Read the counters now and add what they moved (the background thread calls this every ``poll_s``)."""
        with self._lock:
            now = self._read_all()
            for i, zone in enumerate(self._zones):
                self._total_uj[i] += counter_delta_uj(self._last[i], now[i], zone.max_range_uj)
            self._last = now
            self._reads += 1

    def _poll_loop(self) -> None:
        while not self._halt.wait(self.poll_s):
            self.poll()
