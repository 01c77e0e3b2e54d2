"""devices.yaml: the repository's registry validates, and every mistake names the file, device, field and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_compress.errors import ConfigError, UnknownNameError
from edge_compress.profile.devices import LOCAL, DeviceConfig, get_device, load_devices

REPO_DEVICES = Path(__file__).resolve().parents[2] / "devices.yaml"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "devices.yaml"
    p.write_text(text)
    return p


def test_repository_registry_validates_with_one_entry_per_kind_of_device():
    devices = load_devices(REPO_DEVICES)
    local = devices["local"]
    assert (local.connection, local.threads, local.energy_sensor) == ("local", 2, "estimate")
    # this machine runs every CPU backend, our kernels included, with or without the registry file
    assert local.backends == LOCAL.backends == ("onnxruntime", "openvino", "litert", "kernels")
    kinds = {(d.connection, d.energy_sensor) for d in devices.values()}
    assert {("agent", "ina2xx"), ("ssh", "ina3221"), ("adb", "android")} <= kinds
    assert any(d.energy_sensor == "rapl" for d in devices.values())
    jetson = next(d for d in devices.values() if d.energy_sensor == "ina3221")
    assert jetson.power_mode == "15W" and jetson.effective_port == 22
    assert all(d.effective_port == 8765 for d in devices.values() if d.connection == "agent")


def test_unknown_field_names_file_device_and_choices(tmp_path):
    p = write(tmp_path, "devices:\n  pi:\n    connection: agent\n    host: pi\n    token_env: T\n    thread: 4\n")
    with pytest.raises(ConfigError, match=r"devices\.yaml: device 'pi': unknown field\(s\) \['thread'\].*threads"):
        load_devices(p)


@pytest.mark.parametrize("entry, field", [
    ("connection: agent\n    host: pi", "token_env"),
    ("connection: agent\n    token_env: T", "host"),
    ("connection: ssh\n    user: me", "host"),
    ("connection: adb", "serial"),
])
def test_each_connection_names_the_field_it_lacks(tmp_path, entry, field):
    p = write(tmp_path, f"devices:\n  board:\n    {entry}\n")
    with pytest.raises(ConfigError, match=rf"devices\.yaml: device 'board': field '{field}' is missing"):
        load_devices(p)


@pytest.mark.parametrize("entry, field, says", [
    ("connection: local\n    threads: two", "threads", "expected an integer"),
    ("connection: local\n    threads: 0", "threads", "at least 1"),
    ("connection: local\n    backends: onnxruntime", "backends", "list of backend names"),
    ("connection: local\n    backends: [onnxruntime, tflite]", "backends", "litert"),
    ("connection: ssh\n    host: h\n    port: 70000", "port", "between 1 and 65535"),
    ("connection: ssh\n    host: h\n    serial: X1", "serial", "applies to connection adb"),
    ("connection: local\n    energy_sensor: multimeter", "energy_sensor", "usb_meter"),
    ("connection: local\n    energy_sensor: usb_meter", "meter_csv", "exactly when"),
    ("connection: ssh\n    host: h\n    energy_sensor: android", "energy_sensor", "connection adb"),
    ("connection: agent\n    host: h\n    token_env: 'hunter2-secret!'", "token_env", "never the token itself"),
    ("connection: serial", "connection", "local, agent, ssh, adb"),
])
def test_bad_values_name_device_field_and_fix(tmp_path, entry, field, says):
    p = write(tmp_path, f"devices:\n  board:\n    {entry}\n")
    with pytest.raises(ConfigError, match=rf"devices\.yaml: device 'board': field '{field}'") as e:
        load_devices(p)
    assert says in str(e.value)


def test_top_level_must_be_devices_mapping(tmp_path):
    with pytest.raises(ConfigError, match="one top-level key 'devices'"):
        load_devices(write(tmp_path, "device:\n  local:\n    connection: local\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_devices(write(tmp_path, "devices: [\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_devices(tmp_path / "missing.yaml")


def test_device_name_must_be_a_folder_name():
    with pytest.raises(ConfigError, match="field 'name'"):
        DeviceConfig(name="../pi", connection="local")


def test_get_device_lists_choices_and_local_needs_no_registry(tmp_path, monkeypatch):
    with pytest.raises(UnknownNameError, match="choose one of: .*local.*pi4"):
        get_device("pi9", REPO_DEVICES)
    monkeypatch.chdir(tmp_path)  # no devices.yaml here
    assert get_device("local") == LOCAL
    assert get_device("pi4", REPO_DEVICES).host


def test_config_is_hashable_and_round_trips_as_yaml_entry():
    dev = load_devices(REPO_DEVICES)["pi4"]
    assert hash(dev) and isinstance(dev.backends, tuple)
    d = dev.to_dict()
    assert DeviceConfig(**{**d, "backends": tuple(d["backends"])}) == dev
