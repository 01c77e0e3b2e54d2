"""Shared fixtures. Torch runs on one thread in tests: on a 2-core machine two
threads collapse when anything else runs beside them (measured 10x slower)."""

import signal

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _no_sigchld_handler_left_behind():
    """Restore SIGCHLD's default action after each test.

    torch's DataLoader installs a Python SIGCHLD handler the first time it starts worker
    processes and never removes it; every later child exit then interrupts the main thread. The
    full suite once died with SIGSEGV at such a delivery: OpenVINO's CPU plugin had left the main
    thread on a freed alternate signal stack (fixed at its source, see edge_compress.sigstack).
    Restoring the default keeps one test's handler from taking signals during the next.
    """
    yield
    if signal.getsignal(signal.SIGCHLD) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """A small generated dataset (24 train / 8 val images at 64 px), made once per session."""
    from edge_compress.data.synth import generate_synthetic

    root = tmp_path_factory.mktemp("synth") / "data"
    generate_synthetic(root, num_train=24, num_val=8, image_size=64, seed=3)
    return root


@pytest.fixture(scope="session")
def synth128(tmp_path_factory):
    """Generated data matching the shipped conformance detectors (tests/assets/conformance:
    128 px, same generator seed): 32 train / 8 val images, made once per session, never modified."""
    from edge_compress.data.synth import generate_synthetic

    root = tmp_path_factory.mktemp("synth128") / "data"
    generate_synthetic(root, num_train=32, num_val=8, image_size=128, seed=11)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_synth, tmp_path_factory):
    """A yolo_tiny (width 0.25, 64 px) trained for one epoch on ``tiny_synth``: last.pt."""
    from edge_compress.models import create_detector
    from edge_compress.pipeline import open_split
    from edge_compress.train import TrainConfig, train

    ds = open_split(tiny_synth, "train", (64, 64), augment=True, seed=0)
    torch.manual_seed(0)
    model = create_detector("yolo_tiny", class_names=ds.class_names, input_size=64, width_mult=0.25)
    out = tmp_path_factory.mktemp("run")
    train(model, ds, TrainConfig(epochs=1, batch_size=8, lr=2e-3, warmup_iters=2, ema=False), out, progress=False)
    return out / "last.pt"
