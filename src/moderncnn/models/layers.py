"""The few pieces every model family shares.

* :class:`ImageClassifier` -- the base class and the model contract every family keeps (timm's):
  ``forward_features``, ``forward_head``, ``get_classifier``, ``reset_classifier``, ``first_conv``, the
  ``loss`` hook, ``num_classes``, ``in_chans``, ``default_input_size``, ``min_input_size`` and the "input
  too small" check that runs before any layer can fail with a shape error.
* :func:`min_input_size` -- the smallest square input a stack of down-sampling layers accepts.
* :func:`conv_bn_act` and :class:`ClassifierHead` -- the conv-BN-ReLU unit and the pooled linear head.
* :func:`init_kaiming` -- the initialisation torchvision uses for its ResNets and DenseNets.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "InputTooSmallError",
    "ImageClassifier",
    "FeaturesPoolMLP",
    "Downsample",
    "min_input_size",
    "conv_bn_act",
    "ClassifierHead",
    "init_kaiming",
    "mlp_head",
    "CSPStage",
    "replace_submodule",
]

# One spatial down-sampling step: (kernel, stride, padding, ceil_mode).
Downsample = Tuple[int, int, int, bool]


class InputTooSmallError(ValueError):
    """An image smaller than the smallest size a model can process."""


def _out_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    span = size + 2 * padding - kernel
    if span < 0:
        return 0
    out = (math.ceil(span / stride) if ceil_mode else span // stride) + 1
    # PyTorch drops a last window that would start inside the right padding.
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def min_input_size(steps: Iterable[Downsample], limit: int = 4096) -> int:
    """Smallest side length ``s`` for which a chain of down-sampling steps is well defined.

    Two conditions: every step yields at least one output pixel, and ``s`` is at least the total
    stride, so that each cell of the last feature map covers at least one real input pixel rather than
    padding alone (a 1x1 image "works" in a padded ResNet, but says nothing).
    """
    steps = list(steps)
    total_stride = math.prod(stride for _, stride, _, _ in steps) if steps else 1
    for size in range(1, limit + 1):
        s = size
        for kernel, stride, padding, ceil_mode in steps:
            s = _out_size(s, kernel, stride, padding, ceil_mode)
            if s < 1:
                break
        else:
            return max(size, total_stride)
    raise ValueError("no input size up to %d fits these layers" % limit)


class ImageClassifier(nn.Module):
    """Base of every moderncnn model, and the contract fine-tuning and the trainer rely on.

    Subclasses call ``super().__init__(num_classes, in_chans, steps, default_size)`` where ``steps`` lists
    their spatial down-sampling layers in order; the minimum input size follows from them. They define
    :meth:`forward_features` and :meth:`forward_head` and name their parts:

    * ``first_conv``: dotted name of the first convolution (adapted to ``in_chans`` by pretrained weights,
      set to a whitening basis by ``init="whiten"``);
    * ``classifier_name``: dotted name of the final linear layer (:meth:`get_classifier`);
    * ``head_names``: the top-level modules that form the classifier head, trained alone by
      ``--freeze-backbone`` and at a higher learning rate when fine-tuning.
    """

    first_conv: str = "conv1"
    classifier_name: str = "classifier"
    head_names: Tuple[str, ...] = ("classifier",)

    def __init__(self, num_classes: int, in_chans: int, steps: Sequence[Downsample], default_size: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        side = min_input_size(steps)
        self.min_input_size = (in_chans, side, side)
        self.default_input_size = (in_chans, max(default_size, side), max(default_size, side))
        self.model_name = type(self).__name__.lower()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map before the head (N x C x h x w)."""
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits from :meth:`forward_features`' output (pooling, dropout, classifier)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            self.check_input(x)
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.get_submodule(self.classifier_name)

    def reset_classifier(self, num_classes: int) -> None:
        """A freshly initialised classifier for ``num_classes`` classes (fine-tuning on new labels)."""
        old = self.get_classifier()
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
        new.to(device=old.weight.device, dtype=old.weight.dtype)
        replace_submodule(self, self.classifier_name, new)
        self.num_classes = num_classes

    def loss(self, outputs, target: torch.Tensor, criterion: Callable) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits, loss) of a training forward pass; models with auxiliary outputs add their losses here."""
        return outputs, criterion(outputs, target)

    def set_default_input_size(self, side: int) -> "ImageClassifier":
        """The image side the variant is meant for (28 for Fashion-MNIST nets, 96 for d2l's ResNet/DenseNet);
        summaries and exports use it when no size is given."""
        side = max(side, self.min_input_size[1])
        self.default_input_size = (self.in_chans, side, side)
        return self

    @torch.jit.unused
    def check_input(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing() or _compiling():
            return
        if x.dim() != 4:
            raise ValueError(f"{self.model_name} expects a batch of images N x C x H x W, got shape {tuple(x.shape)}")
        channels = self.min_input_size[0]
        if x.shape[1] != channels:
            raise ValueError(f"{self.model_name} was built for {channels}-channel images, got {x.shape[1]} channels")
        self.check_input_size(int(x.shape[-2]), int(x.shape[-1]))

    def check_input_size(self, height: int, width: int, source: str = "", remedy: str = "") -> None:
        """Fail with :class:`InputTooSmallError` naming the minimum size when ``height x width`` is below it.
        ``source`` says where the size came from, ``remedy`` what to change (default: resize or small_input)."""
        side = self.min_input_size[1]
        if height >= side and width >= side:
            return
        remedy = remedy or (f"Resize the images (e.g. --image-size {side}) or build the model with "
                            f"small_input=True where it has that option.")
        raise InputTooSmallError(f"{self.model_name} needs inputs of at least {side}x{side} pixels; "
                                 f"{source or 'got'} {height}x{width}. {remedy}")


class FeaturesPoolMLP(ImageClassifier):
    """AlexNet and VGG's shape: ``features`` (convolutions from ``features.0``), an adaptive ``avgpool``, then
    the two-hidden-layer ``classifier`` of :func:`mlp_head` (its last linear is ``classifier.6``)."""

    first_conv = "features.0"
    classifier_name = "classifier.6"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(x), 1))


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def conv_bn_act(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                act: bool = True) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> BatchNorm -> ReLU, the unit of most post-2015 CNNs."""
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ClassifierHead(nn.Module):
    """Global average pool -> flatten -> (dropout) -> linear."""

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.flatten(self.pool(x))))


def init_kaiming(module: nn.Module, linear_std: float | None = None, mode: str = "fan_out") -> None:
    """He-normal convolutions, unit/zero norms, zero linear biases and, given ``linear_std``, normal linear
    weights: torchvision's rule for ResNet and VGG (fan_out) and DenseNet (fan_in)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0, linear_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def mlp_head(in_features: int, hidden: int, num_classes: int, dropout: float = 0.5,
             dropout_first: bool = False) -> nn.Sequential:
    """The two-hidden-layer classifier of AlexNet and VGG.

    ``dropout_first=True`` puts dropout before each hidden linear (torchvision's AlexNet); otherwise it
    follows each hidden ReLU (VGG, and the d2l AlexNet).
    """
    layers: list = []
    for fan_in in (in_features, hidden):
        block = [nn.Linear(fan_in, hidden), nn.ReLU(inplace=True)]
        drop = nn.Dropout(dropout)
        layers += [drop, *block] if dropout_first else [*block, drop]
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


class CSPStage(nn.Module):
    """Cross-stage partial stage (Wang et al., "CSPNet: A New Backbone that can Enhance Learning
    Capability of CNN", CVPRW 2020).

    After an optional down-sampling ``down``, the channels are split: the first ``split`` channels run
    through ``blocks``, the rest bypass them; both parts are concatenated and fused by ``fuse`` (a 1x1
    convolution, with whatever norm/activation/pool the family uses). Gradients of the bypass never go
    through the blocks, which removes duplicated gradient information and roughly halves the blocks' cost.
    """

    def __init__(self, split: int, blocks: nn.Module, fuse: nn.Module, down: nn.Module | None = None):
        super().__init__()
        self.split = split
        self.down = down if down is not None else nn.Identity()
        self.blocks = blocks
        self.fuse = fuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        part, bypass = x[:, : self.split], x[:, self.split:]
        return self.fuse(torch.cat([self.blocks(part), bypass], 1))


def replace_submodule(model: nn.Module, dotted: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``dotted`` (e.g. ``"head.fc"``) is."""
    *path, last = dotted.split(".")
    parent = model.get_submodule(".".join(path)) if path else model
    setattr(parent, last, new)
