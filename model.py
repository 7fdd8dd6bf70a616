"""ResNet9 for CIFAR-10: the network of the paper, `ResNet(BasicBlock, [1, 1, 1, 1])`.

A 3x3 stem convolution to 64 channels, four stages of one BasicBlock each at 64/128/256/512
channels (strides 1/2/2/2), global average pooling and a linear layer to the classes:
4,903,242 trainable parameters for 10 classes. The layout follows kuangliu/pytorch-cifar's
`models/resnet.py`, from which the paper took its model.

`widths` builds the same network with other channel counts: the ones structured pruning
(prune.py) can change independently of each other. Per stage there are two: the width of its
blocks' first convolution (inside the block, nothing else sees it), and the stage's output
width, which its blocks' second convolutions and projection shortcuts share because their
outputs are added. Stage 1's identity shortcut adds the stem's output to its own, so the
stem's width is stage 1's output width. Eight numbers in all, `STANDARD_WIDTHS` by default.

This file only defines the architecture: no I/O, no argument parsing, no printing.

    >>> from model import resnet9, count_parameters
    >>> count_parameters(resnet9())
    4903242
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("resnet9",)  # names `build_model` accepts; stored in every checkpoint's config
# Channel counts, per stage: (its blocks' first convolution, the stage's output = stage 1's: the stem's too).
STANDARD_WIDTHS = (64, 64, 128, 128, 256, 256, 512, 512)
# The nonlinearity after each BatchNorm (and after each residual sum). ReLU is the paper's; the paper's
# "Improvements" names ELU. None has parameters, so the count stays 4,903,242 whichever is used.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "elu": nn.ELU, "celu": nn.CELU, "gelu": nn.GELU}
# CELU at its default alpha of 1 is ELU, value for value; at 0.075, the value of the fast CIFAR-10
# ResNets that use it (Page's "How to train your ResNet"), it is a ReLU with a smooth knee.
ACTIVATION_ARGS: dict[str, dict] = {"celu": {"alpha": 0.075}}


def make_activation(name: str) -> nn.Module:
    """The activation module named `name` (a key of ACTIVATIONS), with its ACTIVATION_ARGS."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name](**ACTIVATION_ARGS.get(name, {}))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN) shortcut, the activation (ReLU) after
    the first and after the sum."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, activation: str = "relu",
                 inner: int | None = None) -> None:
        super().__init__()
        inner = inner or planes  # the first convolution's width (a pruned block's may be narrower)
        self.act = make_activation(activation)
        self.conv1 = nn.Conv2d(in_planes, inner, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes * self.expansion:
            # The shape changes: project the input so it can be added to the block's output.
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: no max-pool after the stem, so a 32x32 input ends at 4x4 before pooling.
    `widths`: the channel counts (STANDARD_WIDTHS' layout; empty: the standard ones)."""

    def __init__(self, block: type[BasicBlock], num_blocks: list[int], num_classes: int = 10,
                 activation: str = "relu", widths: Sequence[int] = ()) -> None:
        super().__init__()
        widths = tuple(widths) or STANDARD_WIDTHS
        if len(widths) != len(STANDARD_WIDTHS) or not all(type(w) is int and w > 0 for w in widths):
            raise ValueError(f"widths must be {len(STANDARD_WIDTHS)} positive channel counts, got {list(widths)}")
        self.in_planes, self.activation = widths[1], activation
        self.act = make_activation(activation)
        self.conv1 = nn.Conv2d(3, widths[1], 3, stride=1, padding=1, bias=False)  # joined to stage 1's output
        self.bn1 = nn.BatchNorm2d(widths[1])
        self.layer1 = self._make_layer(block, widths[1], num_blocks[0], stride=1, inner=widths[0])
        self.layer2 = self._make_layer(block, widths[3], num_blocks[1], stride=2, inner=widths[2])
        self.layer3 = self._make_layer(block, widths[5], num_blocks[2], stride=2, inner=widths[4])
        self.layer4 = self._make_layer(block, widths[7], num_blocks[3], stride=2, inner=widths[6])
        self.linear = nn.Linear(widths[7] * block.expansion, num_classes)

    def _make_layer(self, block: type[BasicBlock], planes: int, num_blocks: int, stride: int,
                    inner: int | None = None) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):  # only the first block of a stage downsamples
            layers.append(block(self.in_planes, planes, s, self.activation, inner))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # global average pool: 4x4 for 32x32 inputs
        return self.linear(out)


def resnet9(num_classes: int = 10, activation: str = "relu", widths: Sequence[int] = ()) -> ResNet:
    """The paper's model: one BasicBlock per stage, 4,903,242 parameters for 10 classes; with
    `widths`, the same network with those channel counts (a pruned one)."""
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes, activation=activation, widths=widths)


def build_model(arch: str, num_classes: int = 10, activation: str = "relu", widths: Sequence[int] = ()) -> ResNet:
    """Build a model by the names stored in a checkpoint's config."""
    if arch != "resnet9":
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return resnet9(num_classes, activation, widths)


def widths_of(model: ResNet) -> list[int]:
    """The channel counts of a ResNet as `widths` lays them out, read off its layers (after pruning
    changed them in place, the widths to rebuild it with)."""
    out = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        inner = {block.conv1.out_channels for block in stage}
        if len(inner) != 1:
            raise ValueError(f"the blocks of a stage have first convolutions of different widths {sorted(inner)}")
        out += [inner.pop(), stage[-1].conv2.out_channels]
    return out


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
