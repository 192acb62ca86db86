"""``optimize_for_inference``: the same function, computed faster in eval mode.

* BatchNorm folded into the convolution that feeds it (post-activation nets: ResNet, VGG-BN, GoogLeNet,
  CSP; and the bottleneck BN of every DenseNet layer, which directly follows its 1x1 convolution);
* channels-last memory format (the fast layout of oneDNN on CPUs and of cuDNN on tensor cores);
* DenseNet blocks then run their no-grad path, which writes every layer's output into one
  preallocated block buffer instead of re-concatenating a growing list (see ``DenseBlock``);
* DenseNet layers in eval mode apply BN1 as one multiply-add from the block buffer (no BatchNorm call);
* optionally (``jit=True``) ``torch.jit.trace`` + ``torch.jit.freeze`` (+ oneDNN passes on the CPU).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

__all__ = ["fold_batchnorm", "optimize_for_inference"]

# (conv attribute, BN attribute) pairs where, in every moderncnn block that has them, the BN consumes the
# convolution's output and nothing else does.
_FOLD_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), ("conv", "bn"), ("conv1", "norm2"),
               ("conv0", "norm0"))


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    fused = copy.deepcopy(conv)
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
        1 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias.detach() if bn.affine else 0) - bn.running_mean * scale
    weight = conv.weight.detach() * scale.view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias.detach() * scale + shift
    fused.weight = nn.Parameter(weight)
    fused.bias = nn.Parameter(bias)
    return fused


def _foldable(conv, bn) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
            and bn.running_mean is not None and conv.out_channels == bn.num_features)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold eval-mode BatchNorms into their convolutions, in place; the BN becomes ``nn.Identity``."""
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for a, b in zip(names, names[1:]):
                conv, bn = module._modules[a], module._modules[b]
                if _foldable(conv, bn):
                    module._modules[a] = _fold(conv, bn)
                    module._modules[b] = nn.Identity()
            continue
        for conv_name, bn_name in _FOLD_PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if _foldable(conv, bn):
                setattr(module, conv_name, _fold(conv, bn))
                setattr(module, bn_name, nn.Identity())
    return model


def optimize_for_inference(model: nn.Module, example: Optional[torch.Tensor] = None, channels_last: bool = True,
                           jit: bool = False) -> nn.Module:
    """A copy of ``model`` for fast evaluation; outputs equal the original's in eval mode (to ~1e-5).

    Args:
        model: any moderncnn model (left untouched).
        example: a sample input; needed for ``jit=True``, also used to warm up.
        channels_last: convert weights (and expect inputs) to channels-last.
        jit: trace and freeze the result (Python-free execution; on the CPU also oneDNN's inference
            passes). The traced model accepts any batch size. Off by default: on the 2-core CPU we
            measured it was no faster than the eager path and erratic in its first calls.
    """
    fast = copy.deepcopy(model).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    fold_batchnorm(fast)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    wrapped = _InferenceWrapper(fast, channels_last)
    if jit:
        if example is None:
            raise ValueError("optimize_for_inference(jit=True) needs an example input")
        import warnings
        device = next(fast.parameters()).device
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notices
            traced = torch.jit.trace(wrapped, example.to(device), check_trace=False)
            frozen = torch.jit.freeze(traced.eval())
            if device.type == "cpu":
                frozen = torch.jit.optimize_for_inference(frozen)
        return frozen
    if example is not None:
        with torch.no_grad():
            wrapped(example)
    return wrapped


class _InferenceWrapper(nn.Module):
    """Runs the optimised model under ``torch.inference_mode`` with channels-last inputs; keeps the
    attributes (model_name, classes, sizes) of the model it wraps."""

    def __init__(self, model: nn.Module, channels_last: bool):
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        for attr in ("model_name", "num_classes", "in_chans", "min_input_size", "default_input_size", "classes",
                     "preprocessing"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(not torch.jit.is_tracing()):
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.model(x)
