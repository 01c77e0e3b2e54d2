"""Energy per inference: measured by a sensor where one exists, estimated (and labelled so) where not.

Sensors (one small file each, all paths under an injectable ``root``):

* ``RaplSensor``: Intel/AMD RAPL energy counters (powercap), wrap-around handled
* ``Ina3221Sensor``: Jetson rails via hwmon; ``TegrastatsSensor`` / ``parse_tegrastats`` as fallback
* ``Ina2xxSensor``: INA219/INA226 on a Raspberry Pi via the ``ina2xx`` hwmon driver
* ``AndroidBatterySensor``: battery current x voltage over ADB
* ``UsbMeterCsvSensor`` / ``energy_in_window``: an external meter's CSV, aligned by timestamps

``measure_with_idle`` subtracts idle power; ``estimate_energy`` is the
order-of-magnitude fallback (Horowitz, ISSCC 2014); ``detect_sensors`` says
what this machine has. Pure Python: no torch, no numpy.
"""

from edge_compress.profile.energy.android import SIGN_CONVENTIONS, AndroidBatterySensor, adb_shell
from edge_compress.profile.energy.detect import SensorStatus, detect_sensors
from edge_compress.profile.energy.estimate import HOROWITZ_45NM, OpEnergyTable, estimate_energy
from edge_compress.profile.energy.idle import IdleCorrected, measure_with_idle, subtract_idle
from edge_compress.profile.energy.ina2xx import Ina2xxSensor, find_ina2xx
from edge_compress.profile.energy.ina3221 import Ina3221Sensor, RailChannel, find_ina3221_rails
from edge_compress.profile.energy.rapl import RaplSensor, RaplZone, counter_delta_uj, find_rapl_zones
from edge_compress.profile.energy.reading import (
    METHODS,
    EnergyReading,
    MixedReadingsError,
    PowerSample,
    Sensor,
    combine_readings,
    counter_error_j,
    sampled_error_j,
)
from edge_compress.profile.energy.tegrastats import (
    TegrastatsLine,
    TegrastatsSensor,
    parse_tegrastats,
    tegrastats_energy,
)
from edge_compress.profile.energy.usb_meter import (
    MeterCsvFormat,
    UsbMeterCsvSensor,
    energy_in_window,
    read_meter_csv,
)

__all__ = [
    "HOROWITZ_45NM",
    "METHODS",
    "SIGN_CONVENTIONS",
    "AndroidBatterySensor",
    "EnergyReading",
    "IdleCorrected",
    "Ina2xxSensor",
    "Ina3221Sensor",
    "MeterCsvFormat",
    "MixedReadingsError",
    "OpEnergyTable",
    "PowerSample",
    "RailChannel",
    "RaplSensor",
    "RaplZone",
    "Sensor",
    "SensorStatus",
    "TegrastatsLine",
    "TegrastatsSensor",
    "UsbMeterCsvSensor",
    "adb_shell",
    "combine_readings",
    "counter_delta_uj",
    "counter_error_j",
    "detect_sensors",
    "energy_in_window",
    "estimate_energy",
    "find_ina2xx",
    "find_ina3221_rails",
    "find_rapl_zones",
    "measure_with_idle",
    "parse_tegrastats",
    "read_meter_csv",
    "sampled_error_j",
    "subtract_idle",
    "tegrastats_energy",
]
