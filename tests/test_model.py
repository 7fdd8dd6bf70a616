"""The architecture: parameter count, shapes, the block structure."""
import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from model import STANDARD_WIDTHS, BasicBlock, ResNet, build_model, count_parameters, resnet9, widths_of


def test_parameter_count_is_the_papers():
    assert count_parameters(resnet9()) == 4_903_242
    assert count_parameters(ResNet(BasicBlock, [1, 1, 1, 1])) == 4_903_242


def test_count_parameters_skips_frozen_and_buffers():
    model = resnet9()
    model.linear.weight.requires_grad_(False)
    assert count_parameters(model) == 4_903_242 - 512 * 10


def test_output_and_stage_shapes():
    model = resnet9().eval()
    shapes = {}
    for name in ("conv1", "layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape[1:]))
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 10)
    assert shapes == {"conv1": (64, 32, 32), "layer1": (64, 32, 32), "layer2": (128, 16, 16),
                      "layer3": (256, 8, 8), "layer4": (512, 4, 4)}


def test_structure_one_block_per_stage_no_maxpool():
    model = resnet9()
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.conv1.kernel_size == (3, 3) and model.conv1.bias is None and model.conv1.out_channels == 64
    assert model.linear.in_features == 512 and model.linear.out_features == 10


def test_shortcut_projects_only_when_shape_changes():
    same = BasicBlock(64, 64, stride=1)
    assert len(same.shortcut) == 0
    down = BasicBlock(64, 128, stride=2)
    conv, bn = down.shortcut
    assert conv.kernel_size == (1, 1) and conv.stride == (2, 2) and isinstance(bn, nn.BatchNorm2d)
    assert down(torch.randn(2, 64, 32, 32)).shape == (2, 128, 16, 16)


def test_num_classes_and_unknown_arch():
    assert resnet9(num_classes=100)(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet50")


def test_model_file_does_no_io():
    tree = ast.parse((Path(__file__).parent.parent / "model.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    imports = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not names & {"print", "open", "input"}
    assert not (imports | modules) & {"argparse", "os", "sys", "pathlib"}


def test_widths_build_the_network_of_those_channel_counts():
    assert widths_of(resnet9()) == list(STANDARD_WIDTHS)
    assert count_parameters(resnet9(widths=STANDARD_WIDTHS)) == 4_903_242
    widths = [8, 16, 24, 32, 40, 48, 56, 64]
    model = resnet9(num_classes=12, widths=widths).eval()
    assert widths_of(model) == widths
    assert len(model.layer1[0].shortcut) == 0  # stage 1 keeps its identity shortcut: the stem has its width
    assert model.conv1.out_channels == 16 and model.layer2[0].conv1.out_channels == 24
    assert model.layer2[0].shortcut[0].out_channels == 32 and model.linear.in_features == 64
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 12)
    for bad in ([64] * 7, [64, 0, 128, 128, 256, 256, 512, 512], [64.0] * 8):
        with pytest.raises(ValueError, match="widths must be 8 positive channel counts"):
            resnet9(widths=bad)
