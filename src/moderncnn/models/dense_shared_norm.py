"""A dense block's training step with every feature map normalised once per step.

In a dense block, layer ``i``'s first BatchNorm normalises the concatenation of the block input and the
outputs of layers ``1 .. i-1``. Those channels hold the same values for every later layer, so their batch
mean and variance are the same too: only each layer's own scale and shift differ. The ordinary path
(torchvision's) nevertheless concatenates the growing input again in every layer and recomputes its
statistics, and autograd sums every feature map's gradient from each later layer one by one.

Here, in training mode, the block:

* computes each feature map's batch statistics once, when it is made, and writes it normalised into one
  block-sized buffer (no per-layer ``torch.cat``);
* lets each layer apply only its own affine + ReLU to the filled prefix of that buffer;
* in backward, accumulates every layer's gradient with respect to the normalised features in one
  block-sized buffer, and runs the statistics' backward once per feature map;
* updates each layer's running statistics with the shared batch statistics, which is what each layer's
  own BatchNorm would compute for those channels: state dicts, running statistics and
  ``num_batches_tracked`` stay torchvision's.

Backward recomputes each layer's affine + ReLU from the shared buffer into one reusable block-sized
workspace instead of keeping a per-layer copy: one elementwise pass is cheaper than storing a copy that
grows with depth (and, on CPUs, than the page faults of fresh buffers). The normal mode keeps each
bottleneck's convolution output and its activated copy; ``recompute=True`` (the memory-efficient mode, after Pleiss et al.,
"Memory-Efficient Implementation of DenseNets", 2017) keeps nothing per layer but the bottleneck's batch
statistics, and runs the bottleneck's 1x1 convolution once more in backward. Under autocast the buffers
are kept in the autocast dtype, the statistics in fp32.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

aten = torch.ops.aten
_DIMS = (0, 2, 3)
_LAYER_PARAMS = ("norm1.weight", "norm1.bias", "conv1.weight", "conv1.bias", "norm2.weight", "norm2.bias",
                  "conv2.weight", "conv2.bias")


def layer_parameters(layer: nn.Module) -> List[Optional[torch.Tensor]]:
    """A dense layer's parameters in ``_LAYER_PARAMS`` order, None where the layer has none."""
    out = []
    for name in _LAYER_PARAMS:
        module_name, attr = name.split(".")
        module = getattr(layer, module_name, None)
        out.append(getattr(module, attr, None) if module is not None else None)
    return out


def _batch_norm_momentum(norm: nn.BatchNorm2d) -> float:
    """What ``nn.BatchNorm2d`` does in training: count the batch; cumulative average when momentum is None."""
    norm.num_batches_tracked.add_(1)
    return 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum


def _per_channel(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return v.to(dtype).view(1, -1, 1, 1)


def _normalise(f: torch.Tensor, eps: float):
    """``(f - mean) * invstd`` with the batch statistics, which come back in fp32 (unit fp32 weights make
    the kernel return fp32 statistics for bf16/fp16 input)."""
    if f.dtype in (torch.float32, torch.float64):
        return aten.native_batch_norm(f, None, None, None, None, True, 0.0, eps)
    c = f.shape[1]
    ones, zeros = f.new_ones(c, dtype=torch.float32), f.new_zeros(c, dtype=torch.float32)
    return aten.native_batch_norm(f, ones, zeros, None, None, True, 0.0, eps)


def _affine_relu(normed: torch.Tensor, norm: nn.BatchNorm2d, out: torch.Tensor) -> torch.Tensor:
    """``relu(gamma * normed + beta)`` into ``out``: a layer's own part of its first BatchNorm, then its ReLU."""
    gamma, beta = _per_channel(norm.weight, normed.dtype), _per_channel(norm.bias, normed.dtype)
    return torch.addcmul(beta, normed, gamma, out=out).relu_()


def _conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.to(x.dtype)
    return torch.nn.functional.conv2d(x, conv.weight.to(x.dtype), bias, conv.stride, conv.padding, conv.dilation,
                                      conv.groups)


def _conv_backward(grad: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d, grads: dict) -> torch.Tensor:
    has_bias = conv.bias is not None
    gx, gw, gb = aten.convolution_backward(grad, x, conv.weight.to(x.dtype), [conv.out_channels] if has_bias else None,
                                           conv.stride, conv.padding, conv.dilation, False, [0, 0], conv.groups,
                                           [True, True, has_bias])
    grads[conv.weight] = gw.to(conv.weight.dtype)
    if has_bias:
        grads[conv.bias] = gb.to(conv.bias.dtype)
    return gx


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A channels-last (n, c, h, w) tensor as its (n*h*w, c) matrix: a view, no copy."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _pointwise_conv_backward(grad: torch.Tensor, x: torch.Tensor, conv: nn.Conv2d, grads: dict,
                             out: torch.Tensor) -> torch.Tensor:
    """The backward of a 1x1 convolution on channels-last tensors as two matrix products, the input's
    gradient written into ``out`` (a reused workspace) rather than a fresh block-wide tensor per layer."""
    grad_rows = _rows(grad.contiguous(memory_format=torch.channels_last))
    weight = conv.weight.to(x.dtype).reshape(conv.out_channels, -1)
    torch.mm(grad_rows, weight, out=_rows(out))
    grads[conv.weight] = torch.mm(grad_rows.t(), _rows(x)).view(conv.weight.shape).to(conv.weight.dtype)
    if conv.bias is not None:
        grads[conv.bias] = grad_rows.sum(0, dtype=torch.promote_types(grad.dtype, torch.float32)).to(conv.bias.dtype)
    return out


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0) and conv.groups == 1 \
        and conv.dilation == (1, 1)


class _Scratch:
    """One reusable block-sized allocation for transient per-layer tensors: on CPUs a fresh tensor of tens of
    megabytes per layer costs page faults on every step (glibc returns large blocks to the system)."""

    def __init__(self, like: torch.Tensor, channels: int, channels_last: bool):
        n, _, h, w = like.shape
        self.flat = torch.empty(n * channels * h * w, dtype=like.dtype, device=like.device)
        self.shape, self.channels_last = (n, h, w), channels_last

    def view(self, channels: int) -> torch.Tensor:
        n, h, w = self.shape
        data = self.flat[:n * channels * h * w]
        if self.channels_last:
            return data.view(n, h, w, channels).permute(0, 3, 1, 2)
        return data.view(n, channels, h, w)


class SharedNormDenseBlock(torch.autograd.Function):
    """The training forward and backward of a whole dense block (see the module docstring).

    ``forward(ctx, block, recompute, eps, x, *params)``: ``params`` are every layer's eight parameters in
    ``_LAYER_PARAMS`` order (None where absent), passed so that autograd (and DDP's hooks) deliver their
    gradients as usual. Returns the block output, ``cat(x, y_1, ..., y_L)``.
    """

    @staticmethod
    def forward(ctx, block, recompute: bool, eps: float, x: torch.Tensor, *params):
        with torch.autocast(x.device.type, enabled=False):
            return _block_forward(ctx, list(block.values()), block.num_output_features, recompute, eps, x)

    @staticmethod
    def backward(ctx, grad_out):
        grads = _block_backward(ctx, grad_out)
        params = [p for layer in ctx.layers for p in layer_parameters(layer)]
        return (None, None, None, grads.pop("x"), *[grads.get(p) if p is not None else None for p in params])


def _block_forward(ctx, layers: Sequence[nn.Module], total: int, recompute: bool, eps: float, x: torch.Tensor):
    n, c0, h, w = x.shape
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and c0 > 1
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    widths = [c0] + [(layer.conv2 if layer.bottleneck else layer.conv1).out_channels for layer in layers]
    offsets = [sum(widths[:i + 1]) for i in range(len(layers))]   # layer i's input width
    out = torch.empty((n, total, h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
    normed = torch.empty((n, offsets[-1], h, w), dtype=x.dtype, device=x.device, memory_format=fmt)
    scratch = _Scratch(x, offsets[-1], channels_last)
    out[:, :c0] = x
    x_hat, mean, invstd = _normalise(x, eps)
    normed[:, :c0] = x_hat
    means, invstds, saved = [mean], [invstd], []
    for i, layer in enumerate(layers):
        c_in = offsets[i]
        b = _conv(_affine_relu(normed[:, :c_in], layer.norm1, scratch.view(c_in)), layer.conv1)
        c = mean2 = invstd2 = None
        if layer.bottleneck:
            norm2 = layer.norm2
            c, mean2, invstd2 = aten.native_batch_norm(b, norm2.weight, norm2.bias, norm2.running_mean,
                                                       norm2.running_var, True, _batch_norm_momentum(norm2),
                                                       norm2.eps)
            y = _conv(c.relu_(), layer.conv2)
        else:
            y = b
        out[:, c_in:c_in + y.shape[1]] = y
        if i + 1 < len(layers):
            y_hat, mean, invstd = _normalise(y, eps)
            normed[:, c_in:c_in + y.shape[1]] = y_hat
            means.append(mean)
            invstds.append(invstd)
        keep = layer.bottleneck and not recompute
        saved += [b if keep else None, c if keep else None, mean2, invstd2]
    mean_all, invstd_all = torch.cat(means), torch.cat(invstds)
    _update_running_stats(layers, offsets, mean_all, invstd_all, eps, n * h * w)
    ctx.layers, ctx.offsets, ctx.eps, ctx.fmt = layers, offsets, eps, fmt
    ctx.save_for_backward(out, normed, mean_all, invstd_all, *saved)
    return out


@torch.no_grad()
def _update_running_stats(layers, offsets, mean, invstd, eps: float, count: int) -> None:
    # Running variance is the unbiased batch variance, as nn.BatchNorm2d keeps it.
    var = (invstd.double().pow(-2) - eps).clamp_min(0) * (count / max(count - 1, 1))
    var = var.to(invstd.dtype)
    norms = [layer.norm1 for layer in layers]
    momenta = [_batch_norm_momentum(norm) for norm in norms]
    running = [norm.running_mean for norm in norms] + [norm.running_var for norm in norms]
    batch = [mean[:c_in] for c_in in offsets] + [var[:c_in] for c_in in offsets]
    batch = [b.to(r.dtype) for b, r in zip(batch, running)]
    if len(set(momenta)) == 1:   # the usual case: one fused update for every layer of the block
        torch._foreach_lerp_(running, batch, momenta[0])
    else:
        for r, b, momentum in zip(running, batch, momenta + momenta):
            r.lerp_(b, momentum)


def _block_backward(ctx, grad_out: torch.Tensor) -> dict:
    out, normed, mean_all, invstd_all, *saved = ctx.saved_tensors
    layers, offsets, eps = ctx.layers, ctx.offsets, ctx.eps
    grad_out = grad_out.contiguous(memory_format=ctx.fmt)
    # The last layer reads every normalised channel: its gradient initialises the buffer (no zero fill).
    grad_normed = torch.empty_like(normed)
    channels_last = ctx.fmt == torch.channels_last
    scratch = _Scratch(normed, offsets[-1], channels_last)
    grad_scratch = _Scratch(normed, offsets[-1], channels_last) if channels_last else None
    grads = {}
    for i in reversed(range(len(layers))):
        layer, c_in = layers[i], offsets[i]
        b, c, mean2, invstd2 = saved[4 * i:4 * i + 4]
        width = out.shape[1] - c_in if i + 1 == len(layers) else offsets[i + 1] - c_in
        grad_y = grad_out[:, c_in:c_in + width]
        if i + 1 < len(layers):   # y_i was normalised for the later layers: its statistics' backward, once
            grad_y = grad_y + _stats_backward(grad_normed[:, c_in:c_in + width], out[:, c_in:c_in + width],
                                              mean_all[c_in:c_in + width], invstd_all[c_in:c_in + width], eps, ctx.fmt)
        a = _affine_relu(normed[:, :c_in], layer.norm1, scratch.view(c_in))
        if layer.bottleneck:
            if b is None:   # memory-efficient: the bottleneck's input once more, from the recomputed a
                b = _conv(a, layer.conv1)
            grad_b = _bottleneck_backward(layer, grad_y, b, c, mean2, invstd2, grads)
        else:
            grad_b = grad_y
        if grad_scratch is not None and _is_pointwise(layer.conv1):
            grad_a = _pointwise_conv_backward(grad_b, a, layer.conv1, grads, grad_scratch.view(c_in))
        else:
            grad_a = _conv_backward(grad_b, a, layer.conv1, grads)
        grad_a = aten.threshold_backward.grad_input(grad_a, a, 0, grad_input=grad_a)
        _affine_backward(grad_a, normed[:, :c_in], layer.norm1, grad_normed[:, :c_in], scratch, grads,
                         first=i + 1 == len(layers))
    c0 = offsets[0]
    grads["x"] = grad_out[:, :c0] + _stats_backward(grad_normed[:, :c0], out[:, :c0], mean_all[:c0],
                                                    invstd_all[:c0], eps, ctx.fmt)
    return grads


def _bottleneck_backward(layer, grad_y, b, c, mean2, invstd2, grads: dict) -> torch.Tensor:
    norm2 = layer.norm2
    if c is None:   # recompute relu(bn2(b)) with the statistics of forward
        scale = invstd2 * norm2.weight
        c = torch.addcmul(_per_channel(norm2.bias - mean2 * scale, b.dtype), b, _per_channel(scale, b.dtype)).relu_()
    grad_c = _conv_backward(grad_y, c, layer.conv2, grads)
    grad_c = aten.threshold_backward.grad_input(grad_c, c, 0, grad_input=grad_c)
    grad_b, grad_w, grad_bias = aten.native_batch_norm_backward(grad_c, b, norm2.weight, norm2.running_mean,
                                                                norm2.running_var, mean2, invstd2, True, norm2.eps,
                                                                [True, True, True])
    grads[norm2.weight], grads[norm2.bias] = grad_w, grad_bias
    return grad_b


def _affine_backward(grad_a, normed, norm: nn.BatchNorm2d, grad_normed, scratch: _Scratch, grads: dict,
                     first: bool) -> None:
    """Gradients of ``gamma * normed + beta``: gamma's and beta's, and ``gamma * grad`` added to the block's
    gradient with respect to the normalised features (written there by the ``first`` layer backward meets)."""
    accumulate = torch.promote_types(grad_a.dtype, torch.float32)   # fp32 sums for bf16/fp16 gradients
    product = torch.mul(grad_a, normed, out=scratch.view(normed.shape[1]))
    grads[norm.weight] = product.sum(_DIMS, dtype=accumulate).to(norm.weight.dtype)
    grads[norm.bias] = grad_a.sum(_DIMS, dtype=accumulate).to(norm.bias.dtype)
    gamma = _per_channel(norm.weight, grad_a.dtype)
    if first:
        torch.mul(grad_a, gamma, out=grad_normed)
    else:
        grad_normed.addcmul_(grad_a, gamma)


def _stats_backward(grad_hat, f, mean, invstd, eps: float, fmt: torch.memory_format) -> torch.Tensor:
    """The gradient with respect to a feature map ``f`` of ``(f - mean) * invstd`` with batch statistics.
    Both come in as channel slices of block buffers: dense copies of them (a feature map's few channels)
    take the fast BatchNorm kernel, which strided ones do not."""
    ones = invstd.new_ones(invstd.shape)
    grad_hat, f = grad_hat.contiguous(memory_format=fmt), f.contiguous(memory_format=fmt)
    return aten.native_batch_norm_backward(grad_hat, f, ones, None, None, mean, invstd, True, eps,
                                           [True, False, False])[0]
