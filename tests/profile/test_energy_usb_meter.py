"""External USB meter CSV: alignment to the window, exact integrals of piecewise-linear traces, errors."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from edge_compress.errors import ConfigError, DataError
from edge_compress.profile.energy.usb_meter import MeterCsvFormat, UsbMeterCsvSensor, energy_in_window, read_meter_csv

T = 1_764_000_000.0  # epoch seconds; offsets below are binary-exact
# A piecewise-linear power trace (seconds after T, watts); over [0.5, 5] the exact integral is
# 0.5 * (3 + 4) / 2 + 2 * 4 + 1 * (4 + 1) / 2 + 1 * (1 + 2) / 2 = 1.75 + 8 + 2.5 + 1.5 = 13.75 J
TRACE = [(0.0, 2.0), (1.0, 4.0), (3.0, 4.0), (4.0, 1.0), (6.0, 3.0)]
EXACT = 13.75


def write_csv(tmp_path, text, name="meter.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def power_csv(tmp_path):
    return write_csv(tmp_path, "timestamp,power_w\n" + "".join(f"{T + t:.3f},{w}\n" for t, w in TRACE))


def test_piecewise_linear_trace_integrates_exactly(tmp_path):
    r = energy_in_window(power_csv(tmp_path), T + 0.5, T + 5.0)
    assert abs(r.joules - EXACT) < 1e-9
    assert r.window_s == 4.5 and r.mean_watts == pytest.approx(EXACT / 4.5, rel=1e-12)
    assert (r.method, r.measured, r.sample_count) == ("usb-meter-csv", True, 3)  # rows at 1, 3 and 4 s
    assert r.sampling_hz == pytest.approx(3 / 4.5, rel=1e-12)
    # edges: dt = 4.5 / 4 intervals, largest step 3 W (4 -> 1); meter resolution 0
    assert r.error_j == pytest.approx(4.5 / 4 * 3.0, rel=1e-12)


def test_voltage_and_current_columns(tmp_path):
    rows = "".join(f"{T + t},5.0,{w / 5.0!r}\n" for t, w in TRACE)  # V constant: P is still piecewise linear
    path = write_csv(tmp_path, "Timestamp,Voltage(V),Current(A)\n" + rows)
    assert abs(energy_in_window(path, T + 0.5, T + 5.0).joules - EXACT) < 1e-9


def test_iso_timestamps_custom_columns_and_delimiter(tmp_path):
    start = datetime(2026, 11, 24, 10, 0, 0, tzinfo=timezone.utc)
    rows = "".join(f"{(start + timedelta(seconds=t)).isoformat()};{w}\n" for t, w in TRACE)
    path = write_csv(tmp_path, "Time;P_W\n" + rows)
    fmt = MeterCsvFormat(time_column="time", power_column="p_w", delimiter=";", resolution_w=0.001)
    t0 = start.timestamp()
    r = energy_in_window(path, t0 + 0.5, t0 + 5.0, fmt=fmt)
    assert abs(r.joules - EXACT) < 1e-9
    assert r.error_j == pytest.approx(4.5 / 4 * 3.0 + 0.001 * 4.5, rel=1e-12)


def test_clock_offset_and_uncertainty(tmp_path):
    # the meter's clock runs 2 s behind the host: host time = meter time + 2
    r = energy_in_window(power_csv(tmp_path), T + 2.5, T + 7.0, clock_offset_s=2.0, clock_uncertainty_s=0.01)
    assert abs(r.joules - EXACT) < 1e-9
    assert r.error_j == pytest.approx(4.5 / 4 * 3.0 + 0.01 * (3.0 + 2.0), rel=1e-12)


def test_window_between_two_rows(tmp_path):
    r = energy_in_window(power_csv(tmp_path), T + 1.5, T + 2.5)  # constant 4 W, no row inside
    assert r.joules == 4.0 and r.sample_count == 0


def test_window_outside_the_log(tmp_path):
    path = power_csv(tmp_path)
    with pytest.raises(DataError, match=rf"{path}: window .* is outside the meter's time span .*clock_offset_s"):
        energy_in_window(path, T + 5.0, T + 7.0)
    with pytest.raises(ConfigError, match="expected t1 > t0"):
        energy_in_window(path, T + 3.0, T + 2.0)


def test_malformed_row_names_file_row_and_column(tmp_path):
    path = write_csv(tmp_path, "timestamp,power_w\n1.0,2.0\n2.0,2.5\n3.0,n/a\n")
    with pytest.raises(DataError, match=rf"{path}: row 4, column 'power_w': 'n/a' is not a number"):
        read_meter_csv(path)
    bad_time = write_csv(tmp_path, "timestamp,power_w\n1.0,2.0\nyesterday,2.5\n", "t.csv")
    with pytest.raises(DataError, match=r"t.csv: row 3, column 'timestamp': 'yesterday' is not epoch seconds"):
        read_meter_csv(bad_time)
    short = write_csv(tmp_path, "timestamp,power_w\n1.0,2.0\n2.0\n", "s.csv")
    with pytest.raises(DataError, match=r"s.csv: row 3, column 'power_w': missing"):
        read_meter_csv(short)


def test_time_must_increase(tmp_path):
    path = write_csv(tmp_path, "timestamp,power_w\n1.0,2.0\n2.0,2.5\n2.0,3.0\n")
    with pytest.raises(DataError, match=r"row 4, column 'timestamp': time 2.0 does not come after"):
        read_meter_csv(path)


def test_unknown_header_lists_columns(tmp_path):
    path = write_csv(tmp_path, "when,mains\n1,2\n")
    with pytest.raises(DataError, match=r"header \['when', 'mains'\] lacks a time column"):
        read_meter_csv(path)
    with pytest.raises(DataError, match=r"asked for \['t_s'\]"):
        read_meter_csv(power_csv(tmp_path), MeterCsvFormat(time_column="t_s"))


def test_format_validation():
    with pytest.raises(ConfigError, match="set both"):
        MeterCsvFormat(voltage_column="V")
    with pytest.raises(ConfigError, match="not both"):
        MeterCsvFormat(power_column="P", voltage_column="V", current_column="A")


def test_sensor_face_uses_host_epoch_times(tmp_path, fake_clock):
    sensor = UsbMeterCsvSensor(power_csv(tmp_path), clock=fake_clock(T + 0.5, T + 5.0))
    assert sensor.available() == (True, f"meter log {tmp_path / 'meter.csv'}")
    sensor.start()
    assert abs(sensor.stop().joules - EXACT) < 1e-9
    ok, reason = UsbMeterCsvSensor(tmp_path / "none.csv").available()
    assert not ok and "start the meter's logger" in reason
