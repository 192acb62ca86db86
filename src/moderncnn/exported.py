"""Exported model files (see :mod:`moderncnn.export`) as their readers see them: which format a file is, the JSON
of preprocessing beside it, and the file loaded as a function from a normalised batch to logits."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from .runs import RunFileError, UsageError, load_model, read_json_file, read_safetensors

__all__ = ["FORMATS", "meta_path", "exported_format", "export_meta", "load_exported"]

# format -> the file name's ending; `moderncnn export RUN --format F` writes RUN/model<ending>
FORMATS = {"pt2": ".pt2", "onnx": ".onnx", "safetensors": ".safetensors", "aoti": ".aoti.pt2",
           "torchscript": ".torchscript.pt"}


def meta_path(path) -> Path:
    """The JSON beside an exported file: model.pt2 -> model.pt2.json (each format its own)."""
    path = Path(path)
    return path.with_name(f"{path.name}.json")


def _meta_paths(path: Path):
    """Where an exported file's JSON may be: its own, or model.json (exports written before 0.3)."""
    return meta_path(path), path.with_suffix(".json")


def exported_format(path) -> Optional[str]:
    """The format of an exported file (from the JSON beside it, else its name), or None for a checkpoint."""
    path = Path(path)
    for beside in _meta_paths(path):
        if beside.is_file() and path.is_file():
            try:
                fmt = json.loads(beside.read_text()).get("format")
            except (ValueError, OSError, AttributeError):
                fmt = None
            if fmt in FORMATS:
                return fmt
    name = path.name
    for fmt in ("aoti", "pt2", "onnx", "safetensors", "torchscript"):
        if name.endswith(FORMATS[fmt]):
            return fmt
    return None


def load_exported(path) -> Callable[[torch.Tensor], torch.Tensor]:
    """An exported model as a function from a normalised float32 batch to logits (pt2, aoti, torchscript and
    safetensors; ONNX runs in onnxruntime, see :mod:`moderncnn.predict`)."""
    path = Path(path)
    fmt = exported_format(path)
    if fmt == "pt2":
        return torch.export.load(str(path)).module()
    if fmt == "aoti":
        from torch._inductor import aoti_load_package
        return aoti_load_package(str(path))
    if fmt == "torchscript":
        with warnings.catch_warnings():
            # torch.jit.load's deprecation notice: the export said it
            warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    if fmt == "safetensors":
        return load_model(path)
    raise UsageError(f"{path}: not an exported model moderncnn loads into torch (pt2, aoti, torchscript, "
                     f"safetensors)")


def export_meta(path) -> Dict[str, Any]:
    """The preprocessing and model spec of an exported file: the JSON beside it (safetensors carry it inside)."""
    path = Path(path)
    for beside in _meta_paths(path):
        if beside.is_file():
            return read_json_file(beside)
    if path.suffix == ".safetensors":
        return read_safetensors(path)[1]
    raise RunFileError(f"{meta_path(path)}: missing (the preprocessing written beside the exported model)")
