"""glibc's allocator and peak memory.

glibc serves large allocations with mmap and returns them to the system when freed, but after a large free it
raises its mmap threshold (up to 32 MiB) and from then on keeps freed activation buffers in the heap. A
training step's peak resident memory then measures the allocator's history as much as the step's live
memory, and a memory-efficient model saves far less than it could. Pinning the threshold (which also turns off
its adjustment) keeps large buffers on mmap, so that freed memory goes back at once.
"""
from __future__ import annotations

import ctypes
import platform
import sys

__all__ = ["MMAP_THRESHOLD", "pin_mmap_threshold"]

MMAP_THRESHOLD = 128 * 1024  # glibc's default, fixed
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process (``mallopt(M_MMAP_THRESHOLD, threshold)``, as the
    ``MALLOC_MMAP_THRESHOLD_`` environment variable does at start-up). Returns whether it was set: False
    away from Linux with glibc (musl, macOS, Windows), where nothing is changed."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1
