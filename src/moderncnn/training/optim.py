"""Optimizers (no weight decay on norms and biases) and per-step learning-rate schedules."""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .config import MUON_LR

__all__ = ["param_groups", "build_optimizer", "Muon", "orthogonalize", "LRSchedule",
           "ema_warmup_fn"]


def param_groups(model: nn.Module, weight_decay: float, head_lr_mult: float = 1.0,
                 head_names: Iterable[str] = (), train_steps: Optional[Dict[nn.Parameter, int]] = None) -> List[dict]:
    """Split trainable parameters: weight decay for weights of convs/linears only (not norms, not biases,
    not the scalar WRC weights); ``head_lr_mult`` scales the learning rate of the ``head_names`` modules.
    Parameters in ``train_steps`` get a group of their own whose ``train_steps`` key ends their training
    after that many steps (the schedule brings their learning rate to zero by then).

    Every group says what it holds: ``no_decay`` (norms and biases) and ``lr_mult``."""
    head_prefixes = tuple(f"{h}." for h in head_names)
    limited = {id(p): steps for p, steps in (train_steps or {}).items()}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1
        is_head = bool(head_prefixes) and name.startswith(head_prefixes)
        steps = limited.get(id(p), 0)
        key = (no_decay, is_head, steps)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay, "no_decay": no_decay,
                           "lr_mult": head_lr_mult if is_head else 1.0}
            if steps:
                groups[key]["train_steps"] = steps
        groups[key]["params"].append(p)
    return [g for _, g in sorted(groups.items())]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    head_lr_mult: float = 1.0, head_names: Iterable[str] = (), muon_lr: float | None = None,
                    bias_lr: float | None = None, muon_momentum: float | None = None, muon_normalize: bool = False,
                    train_steps: Optional[Dict[nn.Parameter, int]] = None) -> torch.optim.Optimizer:
    """The optimizer of a run. ``bias_lr`` is the peak rate of norms and biases (default ``lr``); under Muon,
    ``muon_lr``, ``muon_momentum`` and ``muon_normalize`` configure the filters' groups (see :class:`Muon`)."""
    groups = param_groups(model, weight_decay, head_lr_mult, head_names, train_steps)
    for g in groups:
        g["lr"] = (bias_lr if g["no_decay"] and bias_lr is not None else lr) * g["lr_mult"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "muon":
        filters = dict(lr=MUON_LR if muon_lr is None else muon_lr, normalize=muon_normalize,
                       momentum=momentum if muon_momentum is None else muon_momentum)
        return Muon(_split_filters(groups, filters), lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def _split_filters(groups: List[dict], filters: dict) -> List[dict]:
    """Move the convolution filters (4-D weights) of each group into a Muon group of their own, with the
    ``filters`` settings (lr, momentum, normalize); the learning rate keeps the group's ``lr_mult``."""
    out = []
    for g in groups:
        banks = [p for p in g["params"] if p.ndim == 4]
        rest = [p for p in g["params"] if p.ndim != 4]
        if rest:
            out.append({**g, "params": rest, "muon": False})
        if banks:
            out.append({**g, **filters, "params": banks, "muon": True, "lr": filters["lr"] * g["lr_mult"]})
    return out


# The quintic Newton-Schulz coefficients of Jordan et al. (2024): they push small singular values up
# fast (slope 3.4 at zero) and leave every singular value within roughly [0.7, 1.2] after five steps.
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def _newton_schulz(x: torch.Tensor, steps: int, eps: float) -> torch.Tensor:
    """Newton-Schulz on a stack of matrices (batch, rows, cols), in float32; the short side iterates."""
    a, b, c = _NS_COEFFICIENTS
    x = x.float()
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:  # X X^T is then the smaller Gram matrix
        x = x.mT
    # Frobenius norm >= spectral norm, so every singular value starts in (0, 1]: the iteration's basin.
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x


def orthogonalize(update, steps: int = 5, eps: float = 1e-7):
    """An approximately orthogonal matrix with the singular vectors of ``update`` (``U V^T`` of its
    SVD, singular values only roughly 1), by a quintic Newton-Schulz iteration on its 2-D view (filters:
    output channels x inputs*kernel), in the input's shape and dtype.

    A list of tensors with the same first dimension is done in one batched iteration and comes back as a
    list: the 2-D views of narrower ones are padded with zero columns to the widest. Zero columns change
    neither the Frobenius norm nor ``X X^T``, so every product of the iteration keeps them zero and the
    other columns equal to the unpadded iteration's: one batch per output width instead of one per
    shape (DenseNet's bottleneck convolutions all have ``bn_size * k`` outputs but a different input
    width each).
    """
    tensors = list(update) if isinstance(update, (list, tuple)) else [update]
    views = [t.reshape(t.shape[0], -1) for t in tensors]
    if len({v.shape[0] for v in views}) > 1:
        raise ValueError(f"orthogonalize batches matrices with one row count, got {[tuple(v.shape) for v in views]}")
    width = max(v.shape[1] for v in views)
    stacked = torch.stack([F.pad(v, (0, width - v.shape[1])) for v in views])
    out = [o[:, :v.shape[1]].reshape(t.shape).to(t.dtype)
           for o, v, t in zip(_newton_schulz(stacked, steps, eps), views, tensors)]
    return out if isinstance(update, (list, tuple)) else out[0]


def _cols(p: torch.Tensor) -> int:
    return math.prod(p.shape[1:])


def _width_batches(pairs: list, max_padding: float = 2.0) -> List[list]:
    """(param, update) pairs of one output width in batches whose widest member is at most ``max_padding``
    times the narrowest: a few batched iterations instead of one per shape (on a GPU each iteration is a
    handful of small kernels), and zero padding at most doubles a member's products (which matter on a CPU)."""
    batches: List[list] = []
    for pair in sorted(pairs, key=lambda pair: _cols(pair[0])):
        if batches and _cols(pair[0]) <= max_padding * _cols(batches[-1][0][0]):
            batches[-1].append(pair)
        else:
            batches.append([pair])
    return batches


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024) for the
    convolution filters, SGD with Nesterov momentum for every other parameter, in one optimizer (so one
    schedule, one state dict and DDP all work as with SGD).

    Groups flagged ``muon`` take the Nesterov-momentum update, orthogonalize it per filter bank
    (``orthogonalize``), scale it by ``sqrt(max(1, out / in))`` so that tall and wide matrices move
    alike, and apply weight decay decoupled (``p *= 1 - lr * wd``). Groups flagged ``normalize`` first rescale
    each filter bank to norm ``sqrt(out_channels)`` (airbench's Muon: with BatchNorm after the convolution the
    scale is free, so this pins the effective step size instead of letting growing weights shrink it). Other groups are plain SGD
    (``torch.optim.SGD``'s update with ``nesterov=True``, coupled weight decay). Orthogonal updates
    change every direction of a filter bank at the same rate, where SGD's follow the gradient's few
    dominant directions; the airbench CIFAR-10 speed runs reach the same accuracy in fewer steps with it.
    """

    def __init__(self, params, lr: float = MUON_LR, momentum: float = 0.9, weight_decay: float = 0.0,
                 ns_steps: int = 5):
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"Muon needs lr > 0 and momentum in [0, 1), got {lr} and {momentum}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, muon=False, ns_steps=ns_steps,
                        normalize=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            filters = {}  # output channels -> [(param, update)]: orthogonalized in one batch (see orthogonalize)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if wd and not group["muon"]:
                    grad = grad.add(p, alpha=wd)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(momentum).add_(grad)
                update = grad.add(state["momentum_buffer"], alpha=momentum) if momentum else grad
                if group["muon"]:
                    filters.setdefault(p.shape[0], []).append((p, update))
                else:
                    p.add_(update, alpha=-lr)
            for rows, pairs in filters.items():
                for batch in _width_batches(pairs):
                    params, updates = (list(t) for t in zip(*batch))
                    if group["normalize"]:
                        for p, norm in zip(params, torch._foreach_norm(params)):
                            p.mul_(rows ** 0.5 / norm)
                    steps = orthogonalize(updates, group["ns_steps"])
                    # tall banks (more outputs than inputs) move as far as wide ones: sqrt(max(1, out / in))
                    torch._foreach_mul_(steps, [-lr * max(1.0, rows / _cols(p)) ** 0.5 for p in params])
                    torch._foreach_mul_(params, 1 - lr * wd)
                    torch._foreach_add_(params, steps)
        return loss


class LRSchedule:
    """Learning-rate factor as a function of the optimizer step (a picklable LambdaLR function).

    ``warmup_steps`` of linear warm-up from 0.1x (unless the schedule brings its own), then:
    cosine (to 0), linear (to 0, airbench's decay), onecycle (linear up for 25% of the steps to the peak, then cosine down to 1/1000,
    Smith & Topin), step (x0.1 at 50% and 75%), or constant.
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0):
        self.kind, self.total, self.warmup = kind, max(1, total_steps), max(0, warmup_steps)

    def __call__(self, step: int) -> float:
        return self.factor(step, self.total)

    def factor(self, step: int, total_steps: int) -> float:
        """The factor at ``step`` of a schedule ``total_steps`` long (a time budget's plan changes it)."""
        total = max(1, total_steps)
        if self.warmup and step < self.warmup:
            return 0.1 + 0.9 * step / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, total - self.warmup))
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        if self.kind == "linear":
            return 1.0 - t
        if self.kind == "step":
            return 1.0 if t < 0.5 else (0.1 if t < 0.75 else 0.01)
        if self.kind == "onecycle":
            peak = 0.25
            if t < peak:
                return 0.04 + 0.96 * t / peak
            return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * (t - peak) / (1 - peak)))
        raise ValueError(f"unknown schedule {self.kind!r}")


def ema_warmup_fn(decay: float):
    """The update of an exponential moving average of the weights whose decay warms up as
    ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (TensorFlow's ``num_updates``, timm's warm-up).

    A fixed 0.999 still holds 0.999**n of the initial random weights after n steps (17% after a 1,755-step
    run); the warm-up makes the early average follow the model and reach the full decay after ~9,000
    steps. Meant as ``AveragedModel``'s ``multi_avg_fn``: it receives the averaged and current tensors and
    the number of updates so far (a tensor, kept on the device so a GPU run never waits for it).
    """
    @torch.no_grad()
    def update(averaged: List[torch.Tensor], current: List[torch.Tensor], num_averaged) -> None:
        # AveragedModel calls this once per (device, dtype) group, so each list has one dtype.
        if not averaged[0].is_floating_point():  # integer buffers (BatchNorm's batch count): copied
            torch._foreach_copy_(averaged, current)
            return
        n = torch.as_tensor(num_averaged, device=averaged[0].device).to(averaged[0].dtype)
        d = torch.clamp((1 + n) / (10 + n), max=decay)
        torch._foreach_mul_(averaged, d)
        torch._foreach_add_(averaged, torch._foreach_mul(current, 1 - d))

    return update
