"""What the hardware computes natively: the one probe that training's precision and ``optimize_for_inference``
both ask, so that they agree."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["cpu_bf16_feature", "cpu_has_native_bf16", "cuda_capability", "native_bf16", "cxx_compiler"]


def cpu_bf16_feature() -> Optional[str]:
    """The CPU feature that computes bfloat16 natively ("AMX" or "AVX512-BF16"), or None where oneDNN would
    emulate it (slower than fp32)."""
    checks = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))  # torch >= 2.3
    for name, probe in checks:
        if getattr(torch.cpu, probe, lambda: False)():
            return name
    return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX)."""
    return cpu_bf16_feature() is not None


def cuda_capability(device: torch.device) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def native_bf16(device: torch.device) -> Tuple[bool, str]:
    """(whether ``device`` computes bfloat16 natively, the fact that says so)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = cuda_capability(device)
        # torch.cuda.is_bf16_supported() also says yes where bfloat16 is only emulated (T4, V100).
        if major >= 8:
            return True, f"the GPU has compute capability {major}.{minor}"
        return False, f"the GPU has compute capability {major}.{minor}, below 8.0"
    if device.type == "cpu":
        feature = cpu_bf16_feature()
        if feature:
            return True, f"the CPU has {feature}"
        return False, "this CPU has no native bfloat16"
    return False, f"{device.type} is not chosen for bfloat16 automatically"


def cxx_compiler() -> Optional[str]:
    """The C++ compiler that inductor (torch.compile, AOTInductor) would call on the CPU, or None."""
    import os
    import shutil
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")
