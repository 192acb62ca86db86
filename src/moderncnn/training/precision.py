"""The precision of a run, decided in one place: bfloat16 autocast where the hardware has it, float16 autocast
with a gradient scaler where it does not (older GPUs), float32 elsewhere; and the gradient scaler's step.

``--amp`` takes ``auto`` (the default), ``bf16``, ``fp16`` or ``off``. :func:`resolve_precision` turns it and the
device into a :class:`Precision` that says what the run computes in and why; the start line, report.md and
summary.json print its :attr:`Precision.description`.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from .. import hardware
from ..hardware import cpu_bf16_feature, cpu_has_native_bf16, cuda_capability
from ..runs import AMP_CHOICES, ModerncnnWarning, UsageError, normalize_amp
from .config import FP32_PRECISIONS

__all__ = ["AMP_CHOICES", "FP32_PRECISIONS", "Precision", "resolve_precision", "normalize_amp", "cpu_bf16_feature",
           "cpu_has_native_bf16", "cuda_capability", "make_grad_scaler", "ScaledBackward", "apply_fp32_precision"]

_NAMES = {None: "float32", torch.bfloat16: "bfloat16 autocast", torch.float16: "float16 autocast + GradScaler"}


@dataclass(frozen=True)
class Precision:
    """What a run computes in: ``dtype`` is the autocast dtype (None: float32), ``scaler`` whether the loss is
    scaled (float16), ``reason`` why this was chosen, ``requested`` the ``--amp`` value it came from."""

    dtype: Optional[torch.dtype]
    scaler: bool
    reason: str
    requested: str = "auto"

    @property
    def kind(self) -> str:
        """"bf16", "fp16" or "off": what was decided, in ``--amp``'s words."""
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "off")

    @property
    def description(self) -> str:
        """e.g. "bfloat16 autocast (the CPU has AMX)"."""
        return f"{_NAMES[self.dtype]} ({self.reason})"

    def autocast(self, device_type: str):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.dtype)


def resolve_precision(amp: Union[bool, str, None], device: torch.device, warn: bool = True) -> Precision:
    """The run's precision on ``device`` from ``--amp`` (see the module docstring)."""
    requested = normalize_amp(amp)
    device = torch.device(device)
    native, why = hardware.native_bf16(device)
    if requested == "off":
        return Precision(None, False, "--amp off", requested)
    if requested == "fp16":
        return Precision(torch.float16, True, "--amp fp16", requested)
    if requested == "bf16":
        if not native and warn:
            warnings.warn(f"--amp bf16: {why}, so bfloat16 is emulated there and slower than float32 "
                          f"(--amp auto picks the fast path)", ModerncnnWarning, stacklevel=2)
        return Precision(torch.bfloat16, False, f"--amp bf16; {why}" if not native else why, requested)
    if native:
        return Precision(torch.bfloat16, False, why, requested)
    if device.type == "cuda":  # an older GPU: float16 is native, its range needs the loss scaled
        return Precision(torch.float16, True, f"{why}: no native bfloat16", requested)
    if device.type == "cpu":
        return Precision(None, False, f"{why}; bf16 would be emulated", requested)
    return Precision(None, False, why, requested)


def make_grad_scaler(precision: Precision, device: torch.device):
    """A ``torch.amp.GradScaler`` for a float16 run, else None."""
    if not precision.scaler:
        return None
    # The schedule steps with every batch, also where the scaler skipped the optimizer's step (the plan
    # counts steps): torch's warning about that order says nothing wrong here.
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
    return torch.amp.GradScaler(torch.device(device).type)


class ScaledBackward:
    """The backward pass and optimizer step of one training step, with or without a gradient scaler.

    Under float16 the loss is scaled before backward, gradients are unscaled before clipping (and before the
    optimizer, so Muon orthogonalises the true gradient), and a step whose gradients overflowed is skipped
    by the scaler, which then halves its scale."""

    def __init__(self, scaler=None):
        self.scaler = scaler

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, parameters=None,
             grad_clip: float = 0.0) -> Optional[torch.Tensor]:
        """Backward and step; under a scaler, returns 1 (on the device) where the scaler skipped the step."""
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(parameters, grad_clip)
            optimizer.step()
            return None
        self.scaler.scale(loss).backward()
        if grad_clip:
            self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(parameters, grad_clip)
        before = self._scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return (self._scale() < before).to(torch.int64)  # the scale backs off only after an overflow

    def _scale(self) -> torch.Tensor:
        # The scale as a device tensor (set by the first scale()): get_scale() would wait for the GPU.
        return self.scaler._scale.detach().clone()

    def state_dict(self) -> Optional[Dict[str, Any]]:
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state: Optional[Dict[str, Any]]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def apply_fp32_precision(level: str) -> None:
    """``--fp32-precision``: how float32 matrix products and convolutions may be computed. "highest" is full
    float32; "high" allows TF32 on Ampere and later GPUs; "medium" also allows bfloat16 internally (oneDNN
    on CPUs with native bfloat16). On torch >= 2.9 the per-backend ``fp32_precision`` settings follow."""
    if level not in FP32_PRECISIONS:
        raise UsageError(f"fp32_precision must be one of {', '.join(FP32_PRECISIONS)}, got {level!r}")
    torch.set_float32_matmul_precision(level)
    cuda = {"highest": "ieee", "high": "tf32", "medium": "tf32"}[level]
    mkldnn = {"highest": "ieee", "high": "ieee", "medium": "bf16"}[level]
    settings = [(getattr(torch.backends.cuda, "matmul", None), cuda),
                (getattr(torch.backends.mkldnn, "matmul", None), mkldnn),
                (getattr(torch.backends.mkldnn, "conv", None), mkldnn)]
    if level != "highest":  # cuDNN convolutions already take TF32 by torch's own default
        settings.append((getattr(torch.backends.cudnn, "conv", None), cuda))
    for backend, value in settings:
        if backend is not None and hasattr(backend, "fp32_precision"):
            backend.fp32_precision = value
