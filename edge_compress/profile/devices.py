"""The device registry (devices.yaml): how to reach each device and what it can measure.

One entry per device, validated when it is read: unknown keys, a field of the
wrong type and a field a connection needs but lacks are errors naming the
file, the device, the field and the fix. The loader never connects to a
device, so entries for boards that are not plugged in still validate.

The ``local`` device (this machine) works without a devices.yaml at all:
``get_device("local")`` falls back to ``LOCAL`` when the default file is absent.
Device side: no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edge_compress.errors import ConfigError, UnknownNameError

DEFAULT_PATH = "devices.yaml"
CONNECTIONS = ("local", "agent", "ssh", "adb")
ENERGY_SENSORS = ("rapl", "ina3221", "tegrastats", "ina2xx", "android", "usb_meter", "estimate", "none")
DEFAULT_PORTS = {"agent": 8765, "ssh": 22}
# Fields only some connections use; setting one elsewhere is a mistake worth naming.
CONNECTION_FIELDS = {
    "local": (),
    "agent": ("host", "port", "token_env"),
    "ssh": ("host", "port", "user", "key_file", "remote_dir"),
    "adb": ("serial", "remote_dir"),
}
REQUIRED_FIELDS = {"local": (), "agent": ("host", "token_env"), "ssh": ("host",), "adb": ("serial",)}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")   # a device name is a folder name in profiles/
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class DeviceConfig:
    """One entry of devices.yaml. Errors say ``device 'NAME': field 'F' ...`` and how to fix it."""

    name: str
    connection: str                 # "local" | "agent" | "ssh" | "adb"
    backends: tuple[str, ...] = ("onnxruntime", "openvino")
    threads: int = 1
    power_mode: str | None = None   # e.g. Jetson nvpmodel "15W", Pi "performance governor"
    energy_sensor: str = "estimate" # one of ENERGY_SENSORS
    host: str | None = None         # agent, ssh
    port: int | None = None         # agent (default 8765), ssh (default 22)
    user: str | None = None         # ssh
    key_file: str | None = None     # ssh
    token_env: str | None = None    # agent: NAME of the environment variable holding the shared token
    serial: str | None = None       # adb
    remote_dir: str | None = None   # ssh/adb working folder on the device
    python: str = "python3"         # ssh/adb: the device's python that has edge-compress[agent]
    meter_csv: str | None = None    # usb_meter: path of the meter's CSV
    description: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.backends, list):  # YAML gives lists; keep the dataclass hashable
            object.__setattr__(self, "backends", tuple(self.backends))
        _check_types(self)
        _check_values(self)
        _check_connection(self)
        _check_energy(self)

    @property
    def effective_port(self) -> int | None:
        """The port a transport connects to: ``port``, else the connection's default."""
        return self.port if self.port is not None else DEFAULT_PORTS.get(self.connection)

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from their defaults (plus name and connection): a YAML entry."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("name", "connection") or v != f.default:
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


def _err(dev: DeviceConfig | str, field: str, msg: str) -> ConfigError:
    name = dev if isinstance(dev, str) else dev.name
    return ConfigError(f"device '{name}': field '{field}' {msg}")


def _check_types(dev: DeviceConfig) -> None:
    for f in fields(dev):
        v = getattr(dev, f.name)
        if f.name == "backends":
            if not isinstance(v, tuple) or not all(isinstance(b, str) for b in v):
                raise _err(dev, f.name, f"is {v!r}; expected a list of backend names, e.g. [onnxruntime, openvino]")
            continue
        want = int if f.name in ("threads", "port") else str
        optional = f.default is None
        if (v is None and optional) or (isinstance(v, want) and not isinstance(v, bool)):
            continue
        raise _err(dev, f.name, f"is {v!r} ({type(v).__name__}); expected {'an integer' if want is int else 'a string'}"
                   f"{' or nothing' if optional else ''}")


def _check_values(dev: DeviceConfig) -> None:
    from edge_compress.backends import list_backends

    if not _NAME.match(dev.name):
        raise _err(dev, "name", "may hold only letters, digits, '_', '.' and '-' (it names a folder under profiles/)")
    if dev.connection not in CONNECTIONS:
        raise _err(dev, "connection", f"is {dev.connection!r}; choose one of: {', '.join(CONNECTIONS)}")
    unknown = [b for b in dev.backends if b not in list_backends()]
    if unknown or not dev.backends:
        raise _err(dev, "backends", f"is {list(dev.backends)}; each must be one of: {', '.join(list_backends())}")
    if dev.threads < 1:
        raise _err(dev, "threads", f"is {dev.threads}; expected at least 1 (the runtime's intra-op threads)")
    if dev.port is not None and not 1 <= dev.port <= 65535:
        raise _err(dev, "port", f"is {dev.port}; expected a TCP port between 1 and 65535")


def _check_connection(dev: DeviceConfig) -> None:
    c = dev.connection
    for name in REQUIRED_FIELDS[c]:
        if getattr(dev, name) in (None, ""):
            raise _err(dev, name, f"is missing; a device with connection '{c}' needs "
                       f"{' and '.join(REQUIRED_FIELDS[c])}")
    every = {n for names in CONNECTION_FIELDS.values() for n in names}
    for name in sorted(every - set(CONNECTION_FIELDS[c])):
        if getattr(dev, name) is not None:
            users = [k for k, v in CONNECTION_FIELDS.items() if name in v]
            raise _err(dev, name, f"applies to connection {' / '.join(users)}, not '{c}'; remove it "
                       "or change the connection")
    if dev.token_env is not None and not _ENV_NAME.match(dev.token_env):
        raise _err(dev, "token_env", "must be the NAME of an environment variable (e.g. EDGE_COMPRESS_PI_TOKEN) "
                   "that holds the token, never the token itself")


def _check_energy(dev: DeviceConfig) -> None:
    s = dev.energy_sensor
    if s not in ENERGY_SENSORS:
        raise _err(dev, "energy_sensor", f"is {s!r}; choose one of: {', '.join(ENERGY_SENSORS)}")
    if (s == "usb_meter") != (dev.meter_csv is not None):
        raise _err(dev, "meter_csv", "is the CSV an external USB meter logs to: give it exactly when "
                   "energy_sensor is usb_meter")
    if s == "android" and dev.connection != "adb":
        raise _err(dev, "energy_sensor", "android reads the battery over ADB: use connection adb with a serial")


# Every backend that runs on a CPU host (TensorRT needs an NVIDIA GPU); one not installed says so at load.
LOCAL_BACKENDS = ("onnxruntime", "openvino", "litert", "kernels")
LOCAL = DeviceConfig(name="local", connection="local", backends=LOCAL_BACKENDS, description="this machine (built in)")


def load_devices(path: str | Path = DEFAULT_PATH) -> dict[str, DeviceConfig]:
    """Every device of a devices.yaml (``devices: {name: {field: value}}``), validated, by name."""
    path = Path(path)
    doc = _read_yaml(path)
    out = {}
    for name, entry in doc["devices"].items():
        out[str(name)] = _device(path, str(name), entry)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ConfigError(f"device registry '{path}' does not exist; pass --devices PATH or create it "
                          "(see the repository's devices.yaml)")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from e
    if not isinstance(doc, dict) or set(doc) != {"devices"} or not isinstance(doc["devices"], dict):
        found = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise ConfigError(f"{path}: expected one top-level key 'devices' mapping names to entries; found {found}")
    return doc


def _device(path: Path, name: str, entry: Any) -> DeviceConfig:
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: device '{name}' is {entry!r}; expected a mapping of fields")
    known = {f.name for f in fields(DeviceConfig)} - {"name"}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise ConfigError(f"{path}: device '{name}': unknown field(s) {unknown}; valid fields: "
                          f"{', '.join(sorted(known))}")
    if "connection" not in entry:
        raise ConfigError(f"{path}: device '{name}': field 'connection' is missing; choose one of: "
                          f"{', '.join(CONNECTIONS)}")
    try:
        return DeviceConfig(name=name, **entry)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def get_device(name: str, path: str | Path = DEFAULT_PATH) -> DeviceConfig:
    """The device called ``name``; an unknown name lists the choices.

    ``local`` needs no registry: when the default devices.yaml is absent it is ``LOCAL``.
    """
    if name == "local" and str(path) == DEFAULT_PATH and not Path(path).is_file():
        return LOCAL
    devices = load_devices(path)
    if name not in devices:
        raise UnknownNameError(f"device '{name}' is not in {path}; choose one of: {', '.join(sorted(devices))} "
                               "(or add an entry for it)")
    return devices[name]

