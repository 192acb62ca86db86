"""Optimizers (no weight decay on norms and biases) and per-step learning-rate schedules."""
from __future__ import annotations

import math
from typing import Iterable, List

import torch
from torch import nn

__all__ = ["param_groups", "build_optimizer", "LRSchedule", "build_scheduler", "ema_warmup_fn"]


def param_groups(model: nn.Module, weight_decay: float, head_lr_mult: float = 1.0,
                 head_names: Iterable[str] = ()) -> List[dict]:
    """Split trainable parameters: weight decay for weights of convs/linears only (not norms, not biases,
    not the scalar WRC weights); ``head_lr_mult`` scales the learning rate of the ``head_names`` modules."""
    head_prefixes = tuple(f"{h}." for h in head_names)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1
        is_head = bool(head_prefixes) and name.startswith(head_prefixes)
        key = (no_decay, is_head)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                           "lr_mult": head_lr_mult if is_head else 1.0}
        groups[key]["params"].append(p)
    return [{k: v for k, v in g.items() if k != "names"} for _, g in sorted(groups.items())]


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9,
                    head_lr_mult: float = 1.0, head_names: Iterable[str] = ()) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay, head_lr_mult, head_names)
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


class LRSchedule:
    """Learning-rate factor as a function of the optimizer step (a picklable LambdaLR function).

    ``warmup_steps`` of linear warm-up from 0.1x (unless the schedule brings its own), then:
    cosine (to 0), onecycle (linear up for 25% of the steps to the peak, then cosine down to 1/1000,
    Smith & Topin), step (x0.1 at 50% and 75%), or constant.
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0):
        self.kind, self.total, self.warmup = kind, max(1, total_steps), max(0, warmup_steps)

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return 0.1 + 0.9 * step / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        if self.kind == "step":
            return 1.0 if t < 0.5 else (0.1 if t < 0.75 else 0.01)
        if self.kind == "onecycle":
            peak = 0.25
            if t < peak:
                return 0.04 + 0.96 * t / peak
            return 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * (t - peak) / (1 - peak)))
        raise ValueError(f"unknown schedule {self.kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int = 0):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(kind, total_steps, warmup_steps))


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
