"""Training configuration validation and the learning-rate schedule."""

import pytest

from edge_compress.errors import ConfigError
from edge_compress.train import TrainConfig
from edge_compress.train.trainer import lr_at


def test_unknown_key_is_rejected_with_the_known_keys():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['epoch'\].*known keys"):
        TrainConfig.from_dict({"epoch": 3}, source="train.yaml")


@pytest.mark.parametrize("field,value", [("epochs", 0), ("lr", -1.0), ("optimizer", "lion"),
                                         ("ema_decay", 1.5), ("workers", -1)])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_warmup_then_cosine():
    cfg = TrainConfig(lr=1.0, warmup_iters=10, warmup_ratio=0.1, final_lr_ratio=0.05)
    assert lr_at(0, 110, cfg) == pytest.approx(0.1)
    assert lr_at(5, 110, cfg) == pytest.approx(0.55)
    assert lr_at(10, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.05 + 0.95 * 0.5)
    assert lr_at(110, 110, cfg) == pytest.approx(0.05)
    lrs = [lr_at(s, 110, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
