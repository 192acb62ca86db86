"""DenseNet and DenseNet-BC (Huang, Liu, van der Maaten & Weinberger, "Densely Connected Convolutional
Networks", CVPR 2017), torchvision-compatible for 121/161/169/201, plus the CIFAR networks of the
paper (DenseNet L=40 k=12; DenseNet-BC L=100 k=12) and the DenseNet of Dive into Deep Learning 7.7.

Every layer sees the concatenation of all earlier feature maps of its block, normalised and activated
first (pre-activation BN-ReLU-Conv). The -BC form adds a 1x1 bottleneck (``bn_size * growth_rate``
channels) and compresses channels by ``compression`` in each transition.

``memory_efficient=True`` keeps nothing per layer for the backward pass but batch statistics: the cheap
parts are recomputed there from one shared buffer of normalised features (Pleiss et al., "Memory-Efficient
Implementation of DenseNets", 2017; ``dense_shared_norm``). Outputs and gradients equal the normal mode.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .dense_shared_norm import SharedNormDenseBlock, layer_parameters
from .layers import CSPStage, ImageClassifier, init_kaiming
from .registry import register_model

__all__ = ["DenseNet", "DenseBlock", "Transition", "densenet_d2l", "densenet40", "densenet_bc_100",
           "densenet121", "densenet161", "densenet169", "densenet201", "densenet264"]


def _fast_eval(module: nn.Module) -> bool:
    return not module.training and not torch.is_grad_enabled() and not torch.jit.is_tracing() \
        and not torch.jit.is_scripting()


def _eval_norm_relu(norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode ``relu(bn(x))`` without autograd: one per-channel multiply-add straight from a (possibly
    strided) block buffer into a dense tensor, then ReLU in place. The result keeps ``x``'s dtype: under
    bfloat16 autocast the buffer is bfloat16, and fp32 statistics would promote every layer's whole input
    to an fp32 copy that the next convolution casts straight back."""
    scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    return torch.addcmul(shift.to(x.dtype).view(1, -1, 1, 1), x, scale.to(x.dtype).view(1, -1, 1, 1)).relu_()


class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-Conv3x3(k) on the concatenated inputs; without a
    bottleneck (``bn_size=0``) just BN-ReLU-Conv3x3(k)."""

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
                 memory_efficient: bool = False, bias: bool = False):
        super().__init__()
        self.bottleneck = bn_size > 0
        first_out = bn_size * growth_rate if self.bottleneck else growth_rate
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, first_out, kernel_size=1 if self.bottleneck else 3,
                               padding=0 if self.bottleneck else 1, bias=bias)
        if self.bottleneck:
            self.norm2 = nn.BatchNorm2d(first_out)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(first_out, growth_rate, kernel_size=3, padding=1, bias=bias)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def concat_norm_conv(self, *inputs: torch.Tensor) -> torch.Tensor:
        x = inputs[0] if len(inputs) == 1 else torch.cat(inputs, 1)
        if _fast_eval(self):
            return self.conv1(_eval_norm_relu(self.norm1, x))
        return self.conv1(self.relu1(self.norm1(x)))

    def forward(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        # torchvision's path; in training, dense blocks usually run their layers through the shared-statistics
        # function instead (DenseBlock), which also implements the memory-efficient mode.
        out = self.concat_norm_conv(*inputs)
        if self.bottleneck:
            out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class DenseBlock(nn.ModuleDict):
    """``num_layers`` dense layers; the output is the input concatenated with every layer's output.

    ``shared_statistics``: in training, normalise each feature map once and share its batch statistics
    with every later layer (``dense_shared_norm``) instead of torchvision's path, where each layer
    concatenates its inputs and normalises them again. Both give the same outputs, gradients and running
    statistics. None (the default) follows the memory mode: the memory-efficient mode always shares; the
    normal mode keeps torchvision's path, which is faster for small feature maps that stay in cache. The
    shared path steps aside for dropout, for norms other than ``nn.BatchNorm2d`` (SyncBatchNorm's statistics
    are synchronised by its own layers) and under TorchScript; the memory-efficient mode then saves nothing.
    """

    def __init__(self, num_layers: int, num_input_features: int, growth_rate: int, bn_size: int = 4,
                 drop_rate: float = 0.0, memory_efficient: bool = False, bias: bool = False,
                 shared_statistics: Optional[bool] = None):
        super().__init__()
        self.shared_statistics = shared_statistics
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(num_input_features + i * growth_rate, growth_rate,
                                                             bn_size, drop_rate, memory_efficient, bias))
        self.num_output_features = num_input_features + num_layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and not torch.jit.is_scripting() and not torch.jit.is_tracing():
            return self._forward_buffer(x)
        if not torch.jit.is_scripting() and not torch.jit.is_tracing() and self._can_share_statistics(x):
            return self._forward_shared(x)
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)

    @torch.jit.unused
    def _can_share_statistics(self, x: torch.Tensor) -> bool:
        if not self.training:
            return False
        layers = list(self.values())
        share = layers[0].memory_efficient if self.shared_statistics is None else self.shared_statistics
        if not (share and x.dim() == 4 and x.is_floating_point()):
            return False
        eps = layers[0].norm1.eps
        # The block calls the BatchNorm kernels itself: only plain nn.BatchNorm2d layers (not SyncBatchNorm).
        return all(type(layer.norm1) is nn.BatchNorm2d and layer.norm1.affine and layer.norm1.track_running_stats
                   and layer.norm1.eps == eps and layer.drop_rate == 0
                   and (not layer.bottleneck or type(layer.norm2) is nn.BatchNorm2d) for layer in layers)

    @torch.jit.unused
    @torch.compiler.disable
    def _forward_shared(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast the block runs in the autocast dtype (the buffers too); the statistics stay fp32.
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        layers = list(self.values())
        params = [p for layer in layers for p in layer_parameters(layer)]
        return SharedNormDenseBlock.apply(self, layers[0].memory_efficient, layers[0].norm1.eps, x, *params)

    @torch.jit.unused
    def _forward_buffer(self, x: torch.Tensor) -> torch.Tensor:
        # Without autograd, every layer writes its new channels into one block-sized buffer and reads
        # the filled prefix: no growing list of concatenations (quadratic copying) per layer.
        n, c, h, w = x.shape
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and c > 1 \
            else torch.contiguous_format
        buffer = torch.empty((n, self.num_output_features, h, w), dtype=x.dtype, device=x.device,
                             memory_format=fmt)
        buffer[:, :c] = x
        filled = c
        for layer in self.values():
            out = layer([buffer[:, :filled]])
            buffer[:, filled:filled + out.shape[1]] = out
            filled += out.shape[1]
        return buffer


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 (compressing channels) -> 2x2 average pool, between dense blocks.

    The 1x1 convolution and the average pool are both linear and commute exactly, so the pool runs
    first: the convolution then sees a quarter of the pixels (same result, same state dict).
    """

    def __init__(self, num_input_features: int, num_output_features: int, bias: bool = False, pool: bool = True):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, bias=bias)
        if pool:
            self.pool = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _eval_norm_relu(self.norm, x) if _fast_eval(self) else self.relu(self.norm(x))
        if hasattr(self, "pool"):
            x = self.pool(x)
        return self.conv(x)


def stem_steps(small_input: bool, stem_stride: int = 1, stem_pool: bool = False, stem_width: int = 0):
    """Down-sampling steps of the DenseNet stems (for the minimum input size)."""
    if small_input:
        first = [(3, 1, 1, False)] if stem_width else []
        return first + [(3, stem_stride, 1, False)] + ([(2, 2, 0, False)] if stem_pool else [])
    return [(7, 2, 3, False), (3, 2, 1, False)]


def make_stem(in_chans: int, width: int, small_input: bool, stem_stride: int = 1, bias: bool = False,
              stem_pool: bool = False, stem_width: int = 0) -> List:
    """The ImageNet stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), or a single 3x3 conv for small images
    (the paper's CIFAR stem; BN-ReLU follows inside the first dense layer). ``stem_pool`` adds BN, ReLU
    and a 2x2 max-pool after the small-input conv: the dense blocks then run at half resolution, as
    with a stride-2 conv, but the stem still sees every pixel. ``stem_width`` > 0 puts a 3x3 conv of
    that many channels (with BN-ReLU) before it: a two-layer "deep stem" (He et al., "Bag of Tricks",
    2019) that gives the full-resolution part of a small network a learned layer of its own."""
    if small_input:
        conv = []
        if stem_width:
            conv = [("conv0a", nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=bias)),
                    ("norm0a", nn.BatchNorm2d(stem_width)), ("relu0a", nn.ReLU(inplace=True))]
            in_chans = stem_width
        conv.append(("conv0", nn.Conv2d(in_chans, width, 3, stride=stem_stride, padding=1, bias=bias)))
        if not stem_pool:
            return conv
        return conv + [("norm0", nn.BatchNorm2d(width)), ("relu0", nn.ReLU(inplace=True)),
                       ("pool0", nn.MaxPool2d(kernel_size=2, stride=2))]
    return [
        ("conv0", nn.Conv2d(in_chans, width, kernel_size=7, stride=2, padding=3, bias=bias)),
        ("norm0", nn.BatchNorm2d(width)),
        ("relu0", nn.ReLU(inplace=True)),
        ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
    ]


class DenseNet(ImageClassifier):
    """DenseNet with torchvision's module names (``features.denseblock1.denselayer1.conv1`` ...).

    Args:
        growth_rate: channels each layer adds (k); a sequence gives each block its own (e.g. ``(16, 32, 64)``,
            the growth that doubles as the resolution halves of CondenseNet, Huang et al. 2018).
        block_config: layers per dense block.
        num_init_features: channels after the stem.
        bn_size: bottleneck width factor (the "B" of -BC); 0 for no bottleneck.
        compression: transition channel factor theta (the "C" of -BC); 1.0 keeps all channels.
        drop_rate: dropout after each dense layer.
        memory_efficient: keep nothing per layer for backward but the shared normalised features and the
            batch statistics; recompute the rest there (shares statistics, below).
        shared_statistics: train each dense block with every feature map normalised once and its batch
            statistics shared by the later layers (``DenseBlock``); None: with ``memory_efficient`` only.
        small_input: a 3x3 conv stem (stride ``stem_stride``) instead of 7x7/2 + max-pool.
        stem_pool: with ``small_input``, BN-ReLU and a 2x2 max-pool after the stem conv.
        stem_width: with ``small_input``, a first full-resolution 3x3 conv of this many channels (0: none).
        bias: biased convolutions (d2l's layers); torchvision's have none.
        channels_last: keep weights and activations channels-last (NHWC), the layout in which oneDNN's
            BatchNorm and convolutions run fastest on CPUs and tensor cores on GPUs; state dicts are
            unaffected.
        cross_stage_partial: if set (e.g. 0.5), each dense block becomes a CSP stage: that fraction of
            its input channels runs through the block, the rest bypasses it, and the transition fuses
            both (CSPDenseNet); the last block gets a 1x1 fusion without pooling.
    """

    def __init__(self, growth_rate: int | Sequence[int] = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, compression: float = 0.5,
                 drop_rate: float = 0.0, num_classes: int = 1000, in_chans: int = 3,
                 memory_efficient: bool = False, small_input: bool = False, stem_stride: int = 1,
                 stem_pool: bool = False, bias: bool = False, cross_stage_partial: float | None = None,
                 channels_last: bool = True, stem_width: int = 0, shared_statistics: Optional[bool] = None):
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        if stem_width and not small_input:
            raise ValueError("stem_width adds a conv to the small-input stem; it needs small_input=True")
        growth_rates = _per_block(growth_rate, len(block_config))
        steps = stem_steps(small_input, stem_stride, stem_pool, stem_width)
        steps += [(2, 2, 0, False)] * (len(block_config) - 1)
        super().__init__(num_classes, in_chans, steps, default_size=32 if small_input else 224)
        self.growth_rate = growth_rate
        self.features = nn.Sequential()
        for name, module in make_stem(in_chans, num_init_features, small_input, stem_stride, bias, stem_pool,
                                       stem_width):
            self.features.add_module(name, module)
        channels = num_init_features
        for i, (num_layers, growth) in enumerate(zip(block_config, growth_rates)):
            last = i == len(block_config) - 1
            if cross_stage_partial is not None:
                part = int(channels * cross_stage_partial)
                block = DenseBlock(num_layers, part, growth, bn_size, drop_rate, memory_efficient, bias,
                                   shared_statistics)
                channels += num_layers * growth
                out = channels if last else int(math.floor(channels * compression))
                fuse = Transition(channels, out, bias, pool=not last)
                self.features.add_module(f"cspblock{i + 1}", CSPStage(part, block, fuse))
                channels = out
                continue
            block = DenseBlock(num_layers, channels, growth, bn_size, drop_rate, memory_efficient, bias,
                               shared_statistics)
            self.features.add_module(f"denseblock{i + 1}", block)
            channels = block.num_output_features
            if not last:
                out = int(math.floor(channels * compression))
                self.features.add_module(f"transition{i + 1}", Transition(channels, out, bias))
                channels = out
        self.features.add_module(f"norm{len(block_config) + 1}", nn.BatchNorm2d(channels))
        self.num_features = channels
        self.classifier = nn.Linear(channels, num_classes)
        self.first_conv = "features.conv0a" if stem_width else "features.conv0"
        init_kaiming(self, mode="fan_in")  # torchvision's initialisation
        self.channels_last = channels_last
        if channels_last:
            self.to(memory_format=torch.channels_last)

    @property
    def memory_efficient(self) -> bool:
        return any(m.memory_efficient for m in self.modules() if isinstance(m, DenseLayer))

    def set_memory_efficient(self, enabled: bool = True) -> "DenseNet":
        for m in self.modules():
            if isinstance(m, DenseLayer):
                m.memory_efficient = enabled
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return F.relu(self.features(x), inplace=True)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))


def _per_block(growth_rate, num_blocks: int) -> tuple:
    """One growth rate per block from an int (the same for all) or a sequence of ``num_blocks`` ints."""
    rates = (growth_rate,) * num_blocks if isinstance(growth_rate, int) else tuple(growth_rate)
    if len(rates) != num_blocks or not all(isinstance(k, int) and k > 0 for k in rates):
        raise ValueError(f"growth_rate must be a positive int or {num_blocks} positive ints (one per block), "
                         f"got {growth_rate!r}")
    return rates


def _densenet(growth_rate: int, block_config, num_init_features: int, num_classes: int, in_chans: int, /,
              **kwargs) -> DenseNet:
    # The variant's shape is a default: ``create_model("densenet121", growth_rate=48)`` (or
    # ``--model-arg growth_rate=48``) overrides it like any other keyword.
    kwargs.setdefault("growth_rate", growth_rate)
    kwargs.setdefault("block_config", tuple(block_config))
    kwargs.setdefault("num_init_features", num_init_features)
    return DenseNet(num_classes=num_classes, in_chans=in_chans, **kwargs)


@register_model
def densenet_d2l(num_classes: int = 10, in_chans: int = 1, **kwargs) -> DenseNet:
    """The DenseNet of d2l 7.7: ImageNet stem (64 channels), four blocks of 4 BN-ReLU-Conv3x3 layers,
    growth 32, no bottleneck, transitions halving channels; biased convolutions; 1x96x96 Fashion-MNIST."""
    kwargs.setdefault("bn_size", 0)
    kwargs.setdefault("bias", True)
    return _densenet(32, (4, 4, 4, 4), 64, num_classes, in_chans, **kwargs).set_default_input_size(96)


@register_model
def densenet40(num_classes: int = 10, in_chans: int = 3, **kwargs) -> DenseNet:
    """DenseNet (L=40, k=12) for 32x32 images: 3 blocks of 12 BN-ReLU-Conv3x3 layers, no compression."""
    kwargs.setdefault("bn_size", 0)
    kwargs.setdefault("compression", 1.0)
    kwargs.setdefault("small_input", True)
    return _densenet(12, (12, 12, 12), 16, num_classes, in_chans, **kwargs)


@register_model
def densenet_bc_100(num_classes: int = 10, in_chans: int = 3, **kwargs) -> DenseNet:
    """DenseNet-BC (L=100, k=12) for 32x32 images: 3 blocks of 16 bottleneck layers, theta 0.5 (~0.8M params)."""
    kwargs.setdefault("small_input", True)
    return _densenet(12, (16, 16, 16), 24, num_classes, in_chans, **kwargs)


@register_model
def densenet121(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16)."""
    return _densenet(32, (6, 12, 24, 16), 64, num_classes, in_chans, **kwargs)


@register_model
def densenet161(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96 initial features)."""
    return _densenet(48, (6, 12, 36, 24), 96, num_classes, in_chans, **kwargs)


@register_model
def densenet169(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32)."""
    return _densenet(32, (6, 12, 32, 32), 64, num_classes, in_chans, **kwargs)


@register_model
def densenet201(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32)."""
    return _densenet(32, (6, 12, 48, 32), 64, num_classes, in_chans, **kwargs)


@register_model
def densenet264(num_classes: int = 1000, in_chans: int = 3, **kwargs) -> DenseNet:
    """DenseNet-264 (k=32, blocks 6-12-64-48)."""
    return _densenet(32, (6, 12, 64, 48), 64, num_classes, in_chans, **kwargs)


@register_model
def densenet_bc_fmnist(num_classes: int = 10, in_chans: int = 1, **kwargs) -> DenseNet:
    """A small DenseNet-BC for 28x28 Fashion-MNIST/MNIST (moderncnn's default training model): a 3x3
    stride-2 stem (the network works at 14x14, 7x7 and 3x3), k=16, blocks 4-8-8, theta 0.5, and a
    bottleneck of 2k channels instead of the paper's 4k (``bn_size=2``).

    The stem is where most of the speed comes from: every dense layer costs a quarter of what it would
    at 28x28. The narrower bottleneck halves the FLOPs again (18.4 instead of 36.0 MFLOPs per image) for
    the same accuracy in a short run; together they let ``moderncnn train`` reach >91% on a 2-core CPU
    in about four minutes. ``bn_size=4`` gives the paper's bottleneck (the ``cifar10`` and
    ``fmnist-best`` recipes use it).
    """
    kwargs.setdefault("small_input", True)
    kwargs.setdefault("stem_stride", 2)
    kwargs.setdefault("bn_size", 2)
    return _densenet(16, (4, 8, 8), 32, num_classes, in_chans, **kwargs).set_default_input_size(28)


@register_model
def densenet_bc_cifar(num_classes: int = 10, in_chans: int = 3, **kwargs) -> DenseNet:
    """A small DenseNet-BC for 32x32 CIFAR-10 on a CPU budget (the ``cifar10`` recipe's network): a 3x3
    stride-1 conv, BN-ReLU and a 2x2 max-pool as the stem (the blocks work at 16x16, 8x8 and 4x4), k=16,
    blocks 4-8-16, the paper's 4k bottleneck and theta 0.5 (577K params, 56.9 MFLOPs per image). Wider and
    deeper than ``densenet_bc_fmnist`` because an hour of CIFAR-10 is capacity-bound for that one (the
    measurements are in docs/results.md).
    """
    kwargs.setdefault("small_input", True)
    kwargs.setdefault("stem_pool", True)
    return _densenet(16, (4, 8, 16), 32, num_classes, in_chans, **kwargs)
