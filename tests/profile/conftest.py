"""Fake sysfs trees and clocks for the energy sensor tests."""

from __future__ import annotations

from pathlib import Path

import pytest


def write_tree(root: Path, files: dict[str, object]) -> Path:
    """Write ``{relative path: value}`` under ``root`` as sysfs does: the value and a newline."""
    for rel, value in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value}\n")
    return root


class FakeClock:
    """Returns the given times in order, then keeps returning the last one."""

    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0) if len(self.times) > 1 else self.times[0]


@pytest.fixture
def tree(tmp_path):
    return lambda files: write_tree(tmp_path, files)


@pytest.fixture
def fake_clock():
    return FakeClock
