"""Layer pruning: removable blocks found on the graph, dropping one equals silencing its branch,
costs drop by the block's own, export, plan round trip, bad input."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from edge_compress.compress.layerdrop import LayerDropConfig, drop_layers, removable_blocks, restructure
from edge_compress.errors import ConfigError
from edge_compress.models import create_detector, summarize

SIZE = 64


def detector(name):
    torch.manual_seed(0)
    model = create_detector(name, num_classes=3, input_size=SIZE)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
                m.bias.normal_(0, 0.1)
    return model.eval()


def image():
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_removable_blocks_per_family():
    mbv2 = removable_blocks(detector("ssdlite_mbv2"))
    assert set(mbv2.values()) == {"residual"}
    assert "backbone.stage4.1" in mbv2 and "backbone.stage4.0" not in mbv2 and "backbone.stage4.4" not in mbv2
    assert len(mbv2) == 10                          # MobileNetV2's 17 blocks less the 7 that change shape
    pico = removable_blocks(detector("picodet_xs"))
    assert set(pico.values()) == {"parallel"} and len(pico) == 2 + 6 + 2     # stride-1 units of 3/7/3
    assert all(n.endswith(".branch2") for n in pico)
    assert removable_blocks(detector("yolo_tiny")) == {}


def test_dropping_a_residual_block_equals_zeroing_its_branch():
    model, silenced = detector("ssdlite_mbv3"), detector("ssdlite_mbv3")
    with torch.no_grad():                           # project BN scale and shift 0: the branch adds exactly 0
        silenced.backbone.stage4[2].project.bn.weight.zero_()
        silenced.backbone.stage4[2].project.bn.bias.zero_()
    rows = {r.name: r for r in summarize(model).layers}
    report = drop_layers(model, LayerDropConfig(blocks=("backbone.stage4.2",)))
    assert isinstance(model.backbone.stage4[2], nn.Identity)
    x = image()
    torch.testing.assert_close(model(x), silenced(x), rtol=1e-6, atol=1e-6)
    own = [r for n, r in rows.items() if n.startswith("backbone.stage4.2.")]
    assert report.macs_before - report.macs_after == sum(r.macs for r in own)
    block_params = sum(p.numel() for p in silenced.backbone.stage4[2].parameters())
    assert report.params_before - report.params_after == block_params
    assert report.kinds == {"backbone.stage4.2": "residual"}


def test_dropping_a_shufflenet_branch_passes_its_half_through():
    model = detector("picodet_xs")
    unit = model.backbone.stage3[2]
    x = image()
    inputs = {}
    hook = unit.register_forward_hook(lambda m, i, o: inputs.setdefault("x", i[0]))
    model(x)
    hook.remove()
    drop_layers(model, LayerDropConfig(blocks=("backbone.stage3.2.branch2",)))
    # the unit is now cat(x1, x2) then the channel shuffle: a plain permutation of its input
    c = inputs["x"].shape[1]
    expected = inputs["x"].view(1, 2, c // 2, *inputs["x"].shape[2:]).transpose(1, 2).reshape(inputs["x"].shape)
    torch.testing.assert_close(unit(inputs["x"]), expected, rtol=0, atol=0)
    assert model(x).shape == detector("picodet_xs")(x).shape


def test_num_blocks_drops_the_lowest_scoring_blocks():
    model = detector("ssdlite_mbv2")
    with torch.no_grad():
        model.backbone.stage3[2].project.bn.weight.mul_(1e-3)
        model.backbone.stage5[1].project.bn.weight.mul_(1e-2)
    report = drop_layers(model, LayerDropConfig(num_blocks=2, criterion="bn_scale"))
    assert report.dropped == ("backbone.stage3.2", "backbone.stage5.1")
    model = detector("ssdlite_mbv2")
    with torch.no_grad():
        model.backbone.stage4[5].project.conv.weight.mul_(1e-3)
    assert drop_layers(model, LayerDropConfig(num_blocks=1)).dropped == ("backbone.stage4.5",)


def test_dropped_model_exports_and_plan_round_trips(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from edge_compress.backends.onnx_export import export_onnx

    for name, blocks in (("ssdlite_mbv2", ("backbone.stage3.1", "backbone.stage4.6")),
                         ("picodet_xs", ("backbone.stage2.1.branch2",))):
        model = detector(name)
        report = drop_layers(model, LayerDropConfig(blocks=blocks))
        plan = json.loads(json.dumps(report.to_dict()))["plan"]
        fresh = create_detector(name, num_classes=3, input_size=SIZE).eval()
        restructure(fresh, plan)
        fresh.load_state_dict(model.state_dict(), strict=True)
        x = image()
        torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
        path = export_onnx(model, tmp_path / f"{name}.onnx")
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
        np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_bad_input_is_a_clear_error():
    model = detector("ssdlite_mbv2")
    with pytest.raises(ConfigError, match="shape"):
        drop_layers(model, LayerDropConfig(blocks=("backbone.stage4.0",)))
    with pytest.raises(ConfigError, match="did you mean"):
        drop_layers(model, LayerDropConfig(blocks=("backbone.stage4.10",)))
    with pytest.raises(ConfigError, match="no identity path"):
        drop_layers(detector("yolo_tiny"), LayerDropConfig(blocks=("backbone.stage3.conv3",)))
    with pytest.raises(ConfigError, match="only 10 removable"):
        drop_layers(model, LayerDropConfig(num_blocks=11))
    assert not any(isinstance(m, nn.Identity) and n.count(".") == 2 for n, m in model.named_modules())
    with pytest.raises(ConfigError, match="exactly one"):
        LayerDropConfig(blocks=("a",), num_blocks=1)
    with pytest.raises(ConfigError, match="exactly one"):
        LayerDropConfig()
    with pytest.raises(ConfigError, match="unknown"):
        LayerDropConfig(num_blocks=1, criterion="taylor")
    with pytest.raises(ConfigError, match="unknown layer_drop setting"):
        LayerDropConfig.from_dict({"num_block": 2})
    cfg = LayerDropConfig(blocks=["a", "b"])
    assert LayerDropConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="not a layer drop plan"):
        restructure(model, {"method": "channel_pruning", "modules": {}})
