"""VGG (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015), torchvision-compatible, plus the narrow VGG-11 of Dive into Deep Learning, section 7.2."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

from .layers import FeaturesPoolMLP, ImageClassifier, init_kaiming, mlp_head
from .registry import register_model

__all__ = ["VGG", "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "vgg_d2l",
           "AirbenchVGG", "vgg_airbench"]

# Each stage: (number of 3x3 convolutions, channels); a 2x2 max-pool closes every stage.
_CONV_ARCH = {
    "vgg11": ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512)),
    "vgg13": ((2, 64), (2, 128), (2, 256), (2, 512), (2, 512)),
    "vgg16": ((2, 64), (2, 128), (3, 256), (3, 512), (3, 512)),
    "vgg19": ((2, 64), (2, 128), (4, 256), (4, 512), (4, 512)),
}


class VGG(FeaturesPoolMLP):
    """Stages of 3x3 convolutions, each closed by a 2x2 max-pool, then a 4096-4096 classifier.

    Args:
        conv_arch: ``(num_convs, channels)`` per stage (d2l's ``conv_arch``).
        batch_norm: BatchNorm after every convolution (the ``*_bn`` variants).
        small_input: drop the first stage's max-pool, so 28x28/32x32 images keep a feature map.
    """

    def __init__(self, conv_arch: Sequence[Tuple[int, int]], num_classes: int = 1000, in_chans: int = 3,
                 batch_norm: bool = False, hidden: int = 4096, dropout: float = 0.5,
                 small_input: bool = False):
        pools = len(conv_arch) - (1 if small_input else 0)
        super().__init__(num_classes, in_chans, [(2, 2, 0, False)] * pools,
                         default_size=32 if small_input else 224)
        layers: List[nn.Module] = []
        channels = in_chans
        for stage, (num_convs, width) in enumerate(conv_arch):
            for _ in range(num_convs):
                layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(width))
                layers.append(nn.ReLU(inplace=True))
                channels = width
            if not (small_input and stage == 0):
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = mlp_head(channels * 7 * 7, hidden, num_classes, dropout)
        init_kaiming(self, linear_std=0.01)  # torchvision's initialisation


def _vgg(arch: str, batch_norm: bool, num_classes: int, in_chans: int, **kwargs) -> VGG:
    return VGG(_CONV_ARCH[arch], num_classes, in_chans, batch_norm=batch_norm, **kwargs)


@register_model
def vgg11(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-11 (configuration "A")."""
    return _vgg("vgg11", False, num_classes, in_chans, **kwargs)


@register_model
def vgg13(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-13 (configuration "B")."""
    return _vgg("vgg13", False, num_classes, in_chans, **kwargs)


@register_model
def vgg16(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-16 (configuration "D")."""
    return _vgg("vgg16", False, num_classes, in_chans, **kwargs)


@register_model
def vgg19(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-19 (configuration "E")."""
    return _vgg("vgg19", False, num_classes, in_chans, **kwargs)


@register_model
def vgg11_bn(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-11 with BatchNorm."""
    return _vgg("vgg11", True, num_classes, in_chans, **kwargs)


@register_model
def vgg13_bn(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-13 with BatchNorm."""
    return _vgg("vgg13", True, num_classes, in_chans, **kwargs)


@register_model
def vgg16_bn(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-16 with BatchNorm."""
    return _vgg("vgg16", True, num_classes, in_chans, **kwargs)


@register_model
def vgg19_bn(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> VGG:
    """VGG-19 with BatchNorm."""
    return _vgg("vgg19", True, num_classes, in_chans, **kwargs)


@register_model
def vgg_d2l(num_classes: int = 10, in_chans: int = 1, ratio: int = 4, **kwargs) -> VGG:
    """The VGG-11 of Dive into Deep Learning 7.2: ``conv_arch`` (1,64)...(2,512) with every width divided
    by ``ratio`` (d2l trains it with ratio 4 on 1x224x224 Fashion-MNIST)."""
    arch = [(n, width // ratio) for n, width in _CONV_ARCH["vgg11"]]
    return VGG(arch, num_classes, in_chans, **kwargs)


class _ConvGroup(nn.Sequential):
    """conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU: one resolution of the airbench network.

    Each convolution starts as the identity on its first input channels (``dirac_``), so the untrained
    network passes the whitened image through; the BatchNorms keep a low statistics momentum and a fixed
    scale of one (only their shift trains), as in the paper."""

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float):
        def norm():
            bn = nn.BatchNorm2d(out_channels, eps=1e-12, momentum=bn_momentum)
            bn.weight.requires_grad_(False)
            return bn

        super().__init__(_dirac_conv(in_channels, out_channels), nn.MaxPool2d(2), norm(), nn.GELU(),
                         _dirac_conv(out_channels, out_channels), norm(), nn.GELU())


def _dirac_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False)
    nn.init.dirac_(conv.weight.data[: min(in_channels, out_channels)])
    return conv


class AirbenchVGG(ImageClassifier):
    """The CIFAR-10 speed-run network of Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU"
    (arXiv 2404.00498): a VGG of three conv groups after a frozen 2x2 patch-whitening convolution.

    ``whiten`` (24 channels for RGB: every eigenvector of the 2x2 patches and its negation) is set from
    the training images by ``init="whiten"`` and stays frozen; only its bias trains (the trainer's
    ``first_conv_bias_epochs`` limits that to the first epochs). The head is a bias-free linear layer of unit
    standard deviation whose output is divided by its width.

    Args:
        widths: channels of the three conv groups (the paper's 64, 256, 256).
        bn_momentum: PyTorch's BatchNorm momentum (the paper's 0.6 "momentum" is 1 - 0.4).
    """

    first_conv = "whiten"
    classifier_name = "head"
    head_names = ("head",)

    def __init__(self, num_classes: int = 10, in_chans: int = 3, widths: Sequence[int] = (64, 256, 256),
                 bn_momentum: float = 0.4, whiten_kernel: int = 2):
        steps = [(whiten_kernel, 1, 0, False)] + [(2, 2, 0, False)] * len(widths)
        super().__init__(num_classes, in_chans, steps, default_size=32)
        self.whiten = nn.Conv2d(in_chans, 2 * in_chans * whiten_kernel ** 2, whiten_kernel, bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        groups, channels = [], self.whiten.out_channels
        for width in widths:
            groups.append(_ConvGroup(channels, width, bn_momentum))
            channels = width
        self.features = nn.Sequential(nn.GELU(), *groups)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(channels, num_classes, bias=False)
        with torch.no_grad():
            self.head.weight.div_(self.head.weight.std())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.whiten(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x).flatten(1)
        return self.head(x) / x.shape[1]


@register_model
def vgg_airbench(num_classes: int = 10, in_chans: int = 3, **kwargs) -> AirbenchVGG:
    """The airbench94 CIFAR-10 network (Jordan, 2024): whitening conv, conv groups of 64/256/256 channels."""
    return AirbenchVGG(num_classes, in_chans, **kwargs)
