"""AlexNet (Krizhevsky, Sutskever & Hinton, "ImageNet Classification with Deep Convolutional Neural
Networks", NeurIPS 2012), in torchvision's single-tower form and in the form of Dive into Deep
Learning, section 7.1."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .layers import FeaturesPoolMLP, mlp_head
from .registry import register_model

__all__ = ["AlexNet", "alexnet", "alexnet_d2l"]


class AlexNet(FeaturesPoolMLP):
    """Five convolutions and three max-pools, then a two-hidden-layer classifier.

    Args:
        widths: output channels of the five convolutions.
        stem_padding: padding of the 11x11 stride-4 first convolution.
        pooled_size: side of the adaptive average pool before the classifier (torchvision: 6).
        dropout_first: dropout before each hidden linear (torchvision) or after each ReLU (d2l).
        small_input: 3x3 stride-1 first convolution, for 28x28/32x32 images.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3,
                 widths: Sequence[int] = (64, 192, 384, 256, 256), stem_padding: int = 2,
                 pooled_size: int = 6, hidden: int = 4096, dropout: float = 0.5,
                 dropout_first: bool = True, small_input: bool = False):
        stem = (3, 1, 1) if small_input else (11, 4, stem_padding)
        pool = (3, 2, 0, False)
        super().__init__(num_classes, in_chans, [(*stem, False), pool, pool, pool],
                         default_size=32 if small_input else 224)
        c1, c2, c3, c4, c5 = widths
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, c1, kernel_size=stem[0], stride=stem[1], padding=stem[2]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c1, c2, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(c2, c3, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((pooled_size, pooled_size))
        self.classifier = mlp_head(c5 * pooled_size * pooled_size, hidden, num_classes, dropout, dropout_first)


@register_model
def alexnet(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> AlexNet:
    """AlexNet as in torchvision (the "one weird trick" single-GPU variant); same state-dict keys."""
    return AlexNet(num_classes, in_chans, **kwargs)


@register_model
def alexnet_d2l(num_classes: int = 10, in_chans: int = 1, **kwargs) -> AlexNet:
    """AlexNet of Dive into Deep Learning 7.1: 96-256-384-384-256 channels, for 1x224x224 Fashion-MNIST.

    At 224x224 the last feature map is 5x5, so the adaptive pool is the identity and the network is
    exactly d2l's (Linear(6400, 4096) first).
    """
    kwargs.setdefault("widths", (96, 256, 384, 384, 256))
    kwargs.setdefault("stem_padding", 1)
    kwargs.setdefault("pooled_size", 5)
    kwargs.setdefault("dropout_first", False)
    return AlexNet(num_classes, in_chans, **kwargs)
