"""Checkpoint files: written atomically, read with ``torch.load(weights_only=True)`` only.

A checkpoint is a dict of tensors, numbers, strings and lists: the model and optimizer state, the
schedule, EMA weights, RNG states, progress, and everything needed to rebuild the model (name,
constructor arguments, classes, preprocessing). Nothing in it is executed when it is read.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Dict, Union

import torch

from .runlock import temporary_name

__all__ = ["CheckpointError", "save_checkpoint", "save_tensors_atomic", "write_text_atomic", "load_checkpoint", "FORMAT"]

FORMAT = "moderncnn-checkpoint-v1"  # the container; the contents carry their own format_version (runs.py)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, unsafe, or for another model."""


def _fsync_directory(directory: Path) -> None:
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a directory that cannot be opened (Windows): the rename is still atomic
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_atomically(path: Union[str, Path], write) -> Path:
    """``write(file)`` into a temporary file beside ``path`` (unique to this process), fsync it, rename it over
    ``path`` and fsync the directory: a crash at any moment leaves the old file or the new one, whole, and a
    failure (a full disk) leaves the old one and no temporary file."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def write_text_atomic(path: Union[str, Path], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically: readers see the old file or the new one, never half."""
    return _write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def save_tensors_atomic(data: Any, path: Union[str, Path]) -> Path:
    """``torch.save`` of plain data and tensors to ``path``, atomically."""
    return _write_atomically(path, lambda f: torch.save(data, f))


def save_checkpoint(state: Dict[str, Any], path: Union[str, Path]) -> Path:
    """Write ``state`` to ``path`` atomically (see :func:`write_text_atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_atomically(path, lambda f: torch.save(dict(state, format=FORMAT), f))


def load_checkpoint(path: Union[str, Path], map_location="cpu") -> Dict[str, Any]:
    """Read a checkpoint file safely (``weights_only=True``) with clear errors for every failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refusing to load: the file holds Python objects other than tensors and "
                              f"plain data, which could run code ({first})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a moderncnn checkpoint (no 'model' entry)")
    return state
