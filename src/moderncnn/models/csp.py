"""Cross-stage partial networks (Wang et al., "CSPNet: A New Backbone that can Enhance Learning
Capability of CNN", CVPRW 2020): ResNet-50 and DenseNet-121 with CSP stages (:class:`CSPStage`)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .densenet import DenseNet
from .layers import ClassifierHead, CSPStage, ImageClassifier, conv_bn_act, init_kaiming
from .registry import register_model
from .resnet import Bottleneck, make_stage, resnet_steps

__all__ = ["CSPResNet", "cspresnet50", "cspdensenet121"]


class CSPResNet(ImageClassifier):
    """ResNet stem, then CSP stages of bottleneck blocks.

    Each stage: a conv-BN-ReLU that sets the width (3x3 stride 2 from the second stage on), a split in
    half, bottleneck blocks on one half (``expansion`` 4 so they keep its width), then concat + 1x1 fusion.

    Args:
        layers: bottleneck blocks per stage; widths: output channels per stage.
        small_input: 3x3 stride-1 stem without max-pool, for 28x28/32x32 images.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), widths: Sequence[int] = (128, 256, 512, 1024),
                 num_classes: int = 1000, in_chans: int = 3, small_input: bool = False, drop_rate: float = 0.0):
        super().__init__(num_classes, in_chans, resnet_steps(small_input, len(layers)),
                         default_size=32 if small_input else 224)
        stem_width = 64
        if small_input:
            self.stem = conv_bn_act(in_chans, stem_width, 3)
        else:
            self.stem = nn.Sequential(*conv_bn_act(in_chans, stem_width, 7, stride=2),
                                      nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        stages = []
        channels = stem_width
        for i, (depth, width) in enumerate(zip(layers, widths)):
            part = width // 2
            stages.append(CSPStage(
                split=part,
                blocks=make_stage(Bottleneck, part, part // Bottleneck.expansion, depth),
                fuse=conv_bn_act(width, width, 1),
                down=conv_bn_act(channels, width, 1 if i == 0 else 3, stride=1 if i == 0 else 2),
            ))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(channels, num_classes, drop_rate)
        self.num_features = channels
        init_kaiming(self)

    first_conv = "stem.0"
    classifier_name = "head.fc"
    head_names = ("head",)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)


@register_model
def cspresnet50(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> CSPResNet:
    """CSP ResNet-50: ResNet-50's stage depths (3, 4, 6, 3) in cross-stage partial stages."""
    return CSPResNet((3, 4, 6, 3), (128, 256, 512, 1024), num_classes, in_chans, **kwargs)


@register_model
def cspdensenet121(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> DenseNet:
    """CSP DenseNet-121: DenseNet-121 whose dense blocks see half of their input channels; the other
    half bypasses the block and meets it again in the (partial) transition."""
    kwargs.setdefault("cross_stage_partial", 0.5)
    return DenseNet(32, (6, 12, 24, 16), 64, num_classes=num_classes, in_chans=in_chans, **kwargs)
