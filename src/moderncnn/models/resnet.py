"""ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016), torchvision-compatible
(v1.5: stride on the 3x3 convolution of the bottleneck), the ResNet-18 of Dive into Deep Learning 7.6,
and the weighted residual connection (WRC): ``alpha * F(x) + beta * shortcut(x)`` with learnable scalars.
"""
from __future__ import annotations

from typing import Optional, Sequence, Type, Union

import torch
from torch import nn

from .layers import ImageClassifier, init_kaiming
from .registry import register_model

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "make_stage", "resnet18", "resnet34", "resnet50",
           "resnet101", "resnet152", "resnet_d2l", "resnet18_wrc"]


def _conv(in_planes: int, out_planes: int, kernel: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel, stride=stride, padding=kernel // 2, bias=bias)


class _Residual(nn.Module):
    """Shared tail of both blocks: the (optionally weighted) sum of branch and shortcut, then ReLU."""

    def _init_merge(self, weighted: bool) -> None:
        self.weighted = weighted
        if weighted:  # WRC: learnable branch and shortcut weights, both starting at 1 (plain ResNet)
            self.alpha = nn.Parameter(torch.ones(1))
            self.beta = nn.Parameter(torch.ones(1))
        self.relu = nn.ReLU(inplace=True)

    def _merge(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        identity = self.downsample(x) if self.downsample is not None else x
        if self.weighted:
            return self.relu(self.alpha * out + self.beta * identity)
        return self.relu(out + identity)


class BasicBlock(_Residual):
    """Two 3x3 convolutions with a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 weighted: bool = False, bias: bool = False):
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 3, stride, bias)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, 1, bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride
        self._init_merge(weighted)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self._merge(out, x)


class Bottleneck(_Residual):
    """1x1 reduce -> 3x3 (carries the stride) -> 1x1 expand (x4), with a shortcut (ResNet-50+)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 weighted: bool = False, bias: bool = False):
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 1, 1, bias)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride, bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv(planes, planes * self.expansion, 1, 1, bias)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample
        self.stride = stride
        self._init_merge(weighted)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self._merge(out, x)


Block = Type[Union[BasicBlock, Bottleneck]]


def make_stage(block: Block, inplanes: int, planes: int, blocks: int, stride: int = 1, weighted: bool = False,
               bias: bool = False, shortcut_norm: bool = True) -> nn.Sequential:
    """``blocks`` residual blocks; the first changes stride/width and gets a 1x1 projection shortcut."""
    downsample = None
    out_planes = planes * block.expansion
    if stride != 1 or inplanes != out_planes:
        proj = [nn.Conv2d(inplanes, out_planes, 1, stride=stride, bias=bias or not shortcut_norm)]
        if shortcut_norm:
            proj.append(nn.BatchNorm2d(out_planes))
        downsample = nn.Sequential(*proj)
    layers = [block(inplanes, planes, stride, downsample, weighted=weighted, bias=bias)]
    layers += [block(out_planes, planes, weighted=weighted, bias=bias) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def resnet_steps(small_input: bool, num_stages: int) -> list:
    """Down-sampling steps of a ResNet-style network: the stem (7x7/2 conv and 3x3/2 max-pool, or one 3x3
    stride-1 conv for small images), then a stride-2 3x3 at the start of every stage after the first."""
    stem = [(3, 1, 1, False)] if small_input else [(7, 2, 3, False), (3, 2, 1, False)]
    return stem + [(3, 2, 1, False)] * (num_stages - 1)


class ResNet(ImageClassifier):
    """Stem (7x7/2 conv, 3x3/2 max-pool) -> four residual stages -> global pool -> linear.

    Args:
        block, layers: block type and blocks per stage (``BasicBlock, [2, 2, 2, 2]`` is ResNet-18).
        small_input: 3x3 stride-1 stem without max-pool, for 28x28/32x32 images.
        weighted: weighted residual connections (WRC) in every block.
        bias, shortcut_norm: d2l's variant uses biased convolutions and a plain 1x1 conv shortcut.
        zero_init_residual: start each block's last BN at zero, so blocks begin as identities.
    """

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int = 1000, in_chans: int = 3,
                 small_input: bool = False, weighted: bool = False, bias: bool = False,
                 shortcut_norm: bool = True, zero_init_residual: bool = False, drop_rate: float = 0.0,
                 widths: Sequence[int] = (64, 128, 256, 512)):
        super().__init__(num_classes, in_chans, resnet_steps(small_input, len(layers)),
                         default_size=32 if small_input else 224)
        stem_width = widths[0]
        if small_input:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 3, stride=1, padding=1, bias=bias)
        else:
            self.conv1 = nn.Conv2d(in_chans, stem_width, 7, stride=2, padding=3, bias=bias)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if small_input else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = stem_width
        for i, (planes, blocks) in enumerate(zip(widths, layers)):
            stage = make_stage(block, inplanes, planes, blocks, stride=1 if i == 0 else 2, weighted=weighted,
                               bias=bias, shortcut_norm=shortcut_norm)
            setattr(self, f"layer{i + 1}", stage)
            inplanes = planes * block.expansion
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(inplanes, num_classes)
        self.num_features = inplanes
        init_kaiming(self)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    first_conv = "conv1"
    classifier_name = "fc"
    head_names = ("fc",)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


@register_model
def resnet18(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> ResNet:
    """ResNet-18."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_chans, **kwargs)


@register_model
def resnet34(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> ResNet:
    """ResNet-34."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_chans, **kwargs)


@register_model
def resnet50(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> ResNet:
    """ResNet-50 (v1.5)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_chans, **kwargs)


@register_model
def resnet101(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> ResNet:
    """ResNet-101 (v1.5)."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, in_chans, **kwargs)


@register_model
def resnet152(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> ResNet:
    """ResNet-152 (v1.5)."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes, in_chans, **kwargs)


@register_model
def resnet_d2l(num_classes: int = 10, in_chans: int = 1, **kwargs) -> ResNet:
    """The ResNet-18 of d2l 7.6: biased convolutions, a plain 1x1 conv shortcut, for 1x96x96 Fashion-MNIST."""
    kwargs.setdefault("bias", True)
    kwargs.setdefault("shortcut_norm", False)
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_chans, **kwargs).set_default_input_size(96)


@register_model
def resnet18_wrc(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> ResNet:
    """ResNet-18 built from weighted residual blocks: ``relu(alpha * F(x) + beta * shortcut(x))``."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_chans, weighted=True, **kwargs)
