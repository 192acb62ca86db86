"""GoogLeNet / Inception v1 (Szegedy et al., "Going Deeper with Convolutions", CVPR 2015).

``googlenet`` matches torchvision (BatchNorm after every convolution, a 3x3 convolution in the
"5x5" branch, optional auxiliary classifiers and ``transform_input``), so torchvision state dicts
load unchanged. ``googlenet_d2l`` is the plain-ReLU network of Dive into Deep Learning, section 7.4.
"""
from __future__ import annotations

from collections import namedtuple
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .layers import ImageClassifier
from .registry import register_model

__all__ = ["GoogLeNet", "GoogLeNetOutputs", "Inception", "googlenet", "googlenet_d2l"]

GoogLeNetOutputs = namedtuple("GoogLeNetOutputs", ["logits", "aux_logits2", "aux_logits1"])


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU, torchvision's Inception unit."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class ConvReLU(nn.Module):
    """Conv (with bias) -> ReLU, the unit of the original paper and of d2l."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x), inplace=True)


class Inception(nn.Module):
    """Four parallel paths (1x1; 1x1-3x3; 1x1-kxk; 3x3 max-pool-1x1) concatenated along channels."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
                 pool_proj: int, conv_block: Callable[..., nn.Module] = BasicConv2d, branch3_kernel: int = 3,
                 pool_ceil_mode: bool = True):
        super().__init__()
        self.branch1 = conv_block(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            conv_block(in_channels, ch3x3red, kernel_size=1),
            conv_block(ch3x3red, ch3x3, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(
            conv_block(in_channels, ch5x5red, kernel_size=1),
            conv_block(ch5x5red, ch5x5, kernel_size=branch3_kernel, padding=branch3_kernel // 2),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=pool_ceil_mode),
            conv_block(in_channels, pool_proj, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], 1)


class InceptionAux(nn.Module):
    """Auxiliary classifier on an intermediate feature map (used in training only)."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.7):
        super().__init__()
        self.conv = BasicConv2d(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(2048, 1024)
        self.fc2 = nn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(p=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.adaptive_avg_pool2d(x, (4, 4)))
        x = F.relu(self.fc1(torch.flatten(x, 1)), inplace=True)
        return self.fc2(self.dropout(x))


# (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj) for 3a, 3b, 4a-4e, 5a, 5b
_INCEPTION_CFG = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32),
    "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64),
    "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64),
    "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128),
    "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}


class GoogLeNet(ImageClassifier):
    """GoogLeNet with torchvision's attribute names.

    Args:
        style: ``"torchvision"`` (BN convs, ceil-mode pools, 3x3 third branch) or ``"d2l"`` (conv+ReLU,
            padded pools, 5x5 third branch, no auxiliary heads).
        aux_logits: add the two auxiliary classifiers; in training mode forward then returns
            :class:`GoogLeNetOutputs` (logits, aux2, aux1).
        transform_input: re-normalise ImageNet-normalised RGB input as the original Google weights expect.
        small_input: 3x3 stride-1 first convolution and no first max-pool, for 28x28/32x32 images.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, aux_logits: bool = False,
                 transform_input: bool = False, dropout: float = 0.2, dropout_aux: float = 0.7,
                 style: str = "torchvision", small_input: bool = False):
        if style not in ("torchvision", "d2l"):
            raise ValueError(f"style must be 'torchvision' or 'd2l', got {style!r}")
        d2l = style == "d2l"
        pool = (3, 2, 1, False) if d2l else (3, 2, 0, True)
        last_pool = pool if d2l else (2, 2, 0, True)
        stem = (3, 1, 1) if small_input else (7, 2, 3)
        steps = [(*stem, False)] + ([] if small_input else [pool]) + [pool, pool, last_pool]
        super().__init__(num_classes, in_chans, steps, default_size=32 if small_input else (96 if d2l else 224))
        if transform_input and in_chans != 3:
            raise ValueError("transform_input applies to 3-channel ImageNet input only")
        conv_block = ConvReLU if d2l else BasicConv2d
        self.aux_logits = aux_logits
        self.transform_input = transform_input

        def make_pool(p):
            return nn.MaxPool2d(p[0], stride=p[1], padding=p[2], ceil_mode=p[3])

        self.conv1 = conv_block(in_chans, 64, kernel_size=stem[0], stride=stem[1], padding=stem[2])
        self.maxpool1 = nn.Identity() if small_input else make_pool(pool)
        self.conv2 = conv_block(64, 64, kernel_size=1)
        self.conv3 = conv_block(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = make_pool(pool)
        for name, cfg in _INCEPTION_CFG.items():
            setattr(self, name, Inception(*cfg, conv_block=conv_block, branch3_kernel=5 if d2l else 3,
                                          pool_ceil_mode=not d2l))
            if name == "inception3b":
                self.maxpool3 = make_pool(pool)
            elif name == "inception4e":
                self.maxpool4 = make_pool(last_pool)
        self.head_names = ("fc", "aux1", "aux2") if aux_logits else ("fc",)
        if aux_logits:
            self.aux1: Optional[InceptionAux] = InceptionAux(512, num_classes, dropout_aux)
            self.aux2: Optional[InceptionAux] = InceptionAux(528, num_classes, dropout_aux)
        else:
            self.aux1 = None
            self.aux2 = None
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(1024, num_classes)
        if not d2l:  # torchvision's initialisation
            for m in self.modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)

    def _transform_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.transform_input:
            x_ch0 = torch.unsqueeze(x[:, 0], 1) * (0.229 / 0.5) + (0.485 - 0.5) / 0.5
            x_ch1 = torch.unsqueeze(x[:, 1], 1) * (0.224 / 0.5) + (0.456 - 0.5) / 0.5
            x_ch2 = torch.unsqueeze(x[:, 2], 1) * (0.225 / 0.5) + (0.406 - 0.5) / 0.5
            x = torch.cat((x_ch0, x_ch1, x_ch2), 1)
        return x

    first_conv = "conv1.conv"
    classifier_name = "fc"

    def _stages(self, x: torch.Tensor):
        """The feature map, and the auxiliary heads' logits in training (else None)."""
        x = self._transform_input(x)
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.maxpool3(self.inception3b(self.inception3a(x)))
        x = self.inception4a(x)
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.maxpool4(self.inception4e(x))
        return self.inception5b(self.inception5a(x)), aux1, aux2

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self._stages(x)[0]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))

    def forward(self, x: torch.Tensor):
        if not torch.jit.is_scripting():
            self.check_input(x)
        x, aux1, aux2 = self._stages(x)
        x = self.forward_head(x)
        if aux1 is not None and aux2 is not None:
            return GoogLeNetOutputs(x, aux2, aux1)
        return x

    def reset_classifier(self, num_classes: int) -> None:
        super().reset_classifier(num_classes)
        for aux in (self.aux1, self.aux2):
            if aux is not None:
                aux.fc2 = nn.Linear(aux.fc2.in_features, num_classes).to(aux.fc2.weight.device)

    def loss(self, outputs, target: torch.Tensor, criterion):
        """Training outputs with auxiliary logits add 0.3x their losses (the paper's weight)."""
        if isinstance(outputs, tuple):
            logits = outputs[0]
            return logits, criterion(logits, target) + 0.3 * sum(criterion(aux, target) for aux in outputs[1:])
        return outputs, criterion(outputs, target)


@register_model
def googlenet(num_classes: int = 1000, in_chans: int = 3, aux_logits: bool = True, **kwargs) -> GoogLeNet:
    """torchvision's GoogLeNet (with its two auxiliary classifiers by default, as torchvision builds it)."""
    return GoogLeNet(num_classes, in_chans, aux_logits=aux_logits, **kwargs)


@register_model
def googlenet_d2l(num_classes: int = 10, in_chans: int = 1, **kwargs) -> GoogLeNet:
    """GoogLeNet of d2l 7.4: five blocks of plain conv+ReLU, trained on 1x96x96 Fashion-MNIST."""
    kwargs.setdefault("dropout", 0.0)
    return GoogLeNet(num_classes, in_chans, style="d2l", **kwargs)
