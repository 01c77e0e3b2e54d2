"""Fake sysfs trees and clocks for the energy sensor tests; the small exported artifacts the
profiler, CLI, agent and remote tests profile (made once per session, never modified)."""

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


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    """``tiny_artifact(backend)``: an untrained ssdlite_mbv2 at 64 px exported once per session per backend."""

    def make(backend: str) -> Path:
        out = tmp_path_factory.getbasetemp() / "profile_artifacts" / backend
        if not out.exists():
            import torch

            from edge_compress.export import export_model
            from edge_compress.models import create_detector

            torch.manual_seed(0)
            export_model(create_detector("ssdlite_mbv2", num_classes=3, input_size=64).eval(), backend, out)
        return out

    return make


@pytest.fixture(scope="session")
def ort_artifact(tiny_artifact):
    return tiny_artifact("onnxruntime")
