"""Network in Network (Lin, Chen & Yan, "Network In Network", ICLR 2014), as in Dive into Deep
Learning, section 7.3: NiN blocks of one spatial convolution and two 1x1 convolutions, no linear
layer; the last block has one channel per class and global average pooling reads them out."""
from __future__ import annotations

import torch
from torch import nn

from .layers import ImageClassifier
from .registry import register_model

__all__ = ["NiN", "nin"]


def _nin_block(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(inplace=True),
    )


class NiN(ImageClassifier):
    """d2l's NiN: 11x11/4 -> pool -> 5x5 -> pool -> 3x3 -> pool -> dropout -> 3x3 (classes) -> GAP.

    ``small_input=True`` makes the first block 3x3 stride 1 for 28x28/32x32 images.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, dropout: float = 0.5, small_input: bool = False):
        stem = (3, 1, 1) if small_input else (11, 4, 0)
        pool = (3, 2, 0, False)
        super().__init__(num_classes, in_chans, [(*stem, False), pool, pool, pool],
                         default_size=32 if small_input else 224)
        self.features = nn.Sequential(
            _nin_block(in_chans, 96, *stem),
            nn.MaxPool2d(3, stride=2),
            _nin_block(96, 256, kernel_size=5, stride=1, padding=2),
            nn.MaxPool2d(3, stride=2),
            _nin_block(256, 384, kernel_size=3, stride=1, padding=1),
            nn.MaxPool2d(3, stride=2),
            nn.Dropout(dropout),
            _nin_block(384, num_classes, kernel_size=3, stride=1, padding=1),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    # No linear layer: the last NiN block has one channel per class and is the classifier.
    first_conv = "features.0.0"
    classifier_name = "features.7"
    head_names = ("features.7",)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features[:-1](x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features[-1](x)), 1)

    def reset_classifier(self, num_classes: int) -> None:
        old = self.features[-1]
        self.features[-1] = _nin_block(old[0].in_channels, num_classes, kernel_size=3, stride=1, padding=1).to(
            old[0].weight.device)
        self.num_classes = num_classes


@register_model
def nin(num_classes: int = 10, in_chans: int = 1, **kwargs) -> NiN:
    """NiN as trained on 1x224x224 Fashion-MNIST in d2l 7.3."""
    return NiN(num_classes, in_chans, **kwargs)
