"""Checkpoint files: written atomically, read with ``torch.load(weights_only=True)`` only.

A checkpoint is a dict of tensors, numbers, strings and lists: the model and optimizer state, the
schedule, EMA weights, RNG states, progress, and everything needed to rebuild the model (name,
constructor arguments, classes, preprocessing). Nothing in it is executed when it is read.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Dict, Union

import torch

__all__ = ["CheckpointError", "save_checkpoint", "write_text_atomic", "load_checkpoint", "FORMAT"]

FORMAT = "moderncnn-checkpoint-v1"  # the container; the contents carry their own format_version (runs.py)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, truncated, unsafe, or for another model."""


def _replace_atomically(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_text_atomic(path: Union[str, Path], text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: readers see the old
    file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(state: Dict[str, Any], path: Union[str, Path]) -> Path:
    """Write ``state`` to ``path`` atomically: temp file in the same directory, flush+fsync, os.replace.
    A crash at any moment leaves either the old file or the new one, whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state, format=FORMAT), f)
            f.flush()
            os.fsync(f.fileno())
        _replace_atomically(Path(tmp), path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
