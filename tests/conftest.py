"""Shared fixtures. Torch runs on one thread in tests: on a 2-core machine two
threads collapse when anything else runs beside them (measured 10x slower)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """A small generated dataset (24 train / 8 val images at 64 px), made once per session."""
    from edge_compress.data.synth import generate_synthetic

    root = tmp_path_factory.mktemp("synth") / "data"
    generate_synthetic(root, num_train=24, num_val=8, image_size=64, seed=3)
    return root
