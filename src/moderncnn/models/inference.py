"""``optimize_for_inference``: the same function, computed faster in eval mode.

* BatchNorm folded into the convolution that feeds it (post-activation nets: ResNet, VGG-BN, GoogLeNet,
  CSP; and the bottleneck BN of every DenseNet layer, which directly follows its 1x1 convolution);
* channels-last memory format (the fast layout of oneDNN on CPUs and of cuDNN on tensor cores);
* DenseNet blocks then run their no-grad path, which writes every layer's output into one
  preallocated block buffer instead of re-concatenating a growing list (see ``DenseBlock``);
* DenseNet layers in eval mode apply BN1 as one multiply-add from the block buffer (no BatchNorm call);
* bfloat16 weights and activations where the device computes bfloat16 natively (the probe of
  :mod:`moderncnn.hardware`, the same one that training's ``--amp auto`` asks); logits come back in float32;
* optionally (``compile=True``) ``torch.compile`` with inductor's freezing, which constant-folds the weights
  and prepacks them for oneDNN. It costs a compilation on the first call of each new input shape.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

__all__ = ["PRECISIONS", "fold_batchnorm", "inference_dtype", "optimize_for_inference"]

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


PRECISIONS = ("auto", "bf16", "fp16", "off")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def inference_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The dtype ``optimize_for_inference`` computes in: ``auto`` is bfloat16 where ``device`` has it natively,
    float32 (None) elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        from ..hardware import native_bf16
        return torch.bfloat16 if native_bf16(device)[0] else None
    return _DTYPES[precision]


def optimize_for_inference(model: nn.Module, example: Optional[torch.Tensor] = None, channels_last: bool = True,
                           precision: str = "auto", compile: bool = False, jit: bool = False) -> nn.Module:
    """A copy of ``model`` for fast evaluation, the original left untouched. In float32 its outputs equal the
    original's in eval mode (to ~1e-5); in bfloat16 to bfloat16's precision (top-1 agrees).

    Args:
        model: any moderncnn model.
        example: a sample input, run once to warm up (and, with ``compile``, to compile).
        channels_last: convert weights (and inputs) to channels-last.
        precision: "auto" (bfloat16 where the device computes it natively, else float32), "bf16", "fp16" or
            "off" (float32). The choice is kept as the result's ``precision`` attribute.
        compile: ``torch.compile`` the folded model with inductor's freezing (needs a C++ compiler on the CPU).
        jit: deprecated (TorchScript is deprecated in torch); means ``compile=True``.
    """
    if jit:
        import warnings
        warnings.warn("optimize_for_inference(jit=True) is deprecated, as TorchScript is in torch: it now means "
                      "compile=True (torch.compile with freezing)", FutureWarning, stacklevel=2)
        compile = True
    fast = copy.deepcopy(model).eval()
    for p in fast.parameters():
        p.requires_grad_(False)
    fold_batchnorm(fast)
    device = next(fast.parameters()).device
    dtype = inference_dtype(precision, device)
    if dtype is not None:
        fast = fast.to(dtype)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    wrapped = _InferenceWrapper(fast, channels_last, dtype)
    if compile:
        wrapped.model = _compiled(fast, device)
    if example is not None:
        wrapped(example.to(device))
    return wrapped


def _compiled(model: nn.Module, device: torch.device) -> nn.Module:
    from ..hardware import cxx_compiler
    if device.type == "cpu" and not cxx_compiler():
        raise RuntimeError("optimize_for_inference(compile=True) needs a C++ compiler (g++ or clang++) on the "
                           "CPU; none was found (set CXX, or leave compile off)")
    # freezing: weights become constants that inductor folds and prepacks (inference only)
    return torch.compile(model, options={"freezing": True})


class _InferenceWrapper(nn.Module):
    """Runs the optimised model under ``torch.inference_mode`` with channels-last inputs in its dtype, and
    returns float32; keeps the attributes (model_name, classes, sizes) of the model it wraps."""

    def __init__(self, model: nn.Module, channels_last: bool, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self.dtype = dtype
        self.precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "off")
        for attr in ("model_name", "num_classes", "in_chans", "min_input_size", "default_input_size", "classes",
                     "preprocessing"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self.dtype is not None:
                x = x.to(self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = self.model(x)
            return out.float() if self.dtype is not None else out
