"""Weight initialisations chosen by a recipe's ``init``: d2l's Xavier, and patch whitening of the first
convolution (the data-dependent initialisation of Jordan's airbench, after Coates & Ng 2012)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["xavier_init", "whiten_first_conv"]


def xavier_init(model: nn.Module) -> None:
    """d2l's ``train_ch6``: Xavier-uniform weights for every Linear and Conv2d (biases left as they are)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)


@torch.no_grad()
def whiten_first_conv(model: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                      image_size: int = 0, max_images: int = 1000, eps: float = 5e-4) -> nn.Conv2d:
    """Set the first convolution's filters to the whitening basis of the training images' patches.

    The covariance of the (normalised) ``k x k`` patches is diagonalised; each eigenvector, scaled by
    ``1 / sqrt(eigenvalue + eps)``, becomes a filter, strongest first, with its negation beside it so
    that a following ReLU keeps both signs. Filters beyond ``2 * C * k * k`` keep their initialisation.
    The layer starts out decorrelating its input, which speeds up the first epochs of a short run.
    """
    conv = model.get_submodule(model.first_conv)
    if conv.groups != 1:
        raise ValueError("patch whitening needs a dense (groups=1) first convolution")
    kh, kw = conv.kernel_size
    sample = images[:max_images].float().div_(255)
    if image_size and sample.shape[-1] != image_size:
        sample = F.interpolate(sample, size=(image_size, image_size), mode="bilinear", antialias=True,
                               align_corners=False)
    sample = (sample - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    if sample.shape[1] != conv.in_channels:
        raise ValueError(f"the first convolution takes {conv.in_channels} channels, the images have "
                         f"{sample.shape[1]}")
    patches = F.unfold(sample, (kh, kw)).transpose(1, 2).reshape(-1, conv.in_channels * kh * kw).double()
    eigenvalues, eigenvectors = torch.linalg.eigh(torch.cov(patches.T))  # ascending order
    filters = (eigenvectors.T / (eigenvalues.clamp_min(0) + eps).sqrt()[:, None]).flip(0)
    pairs = min(conv.out_channels // 2, filters.shape[0])
    weight = torch.cat([filters[:pairs], -filters[:pairs]]).view(2 * pairs, conv.in_channels, kh, kw)
    conv.weight[: 2 * pairs] = weight.to(conv.weight.dtype)
    if conv.bias is not None:
        conv.bias[: 2 * pairs] = 0
    return conv
