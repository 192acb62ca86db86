"""Export a trained model for serving: ONNX (onnxruntime) or TorchScript, BatchNorm folded, dynamic batch
axis, with the preprocessing written beside it as JSON (input size, channels, mean/std, class names)."""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from .checkpoint import write_text_atomic
from .models.inference import fold_batchnorm
from .runs import ModelSpec, build_model, read_checkpoint, resolve_checkpoint

__all__ = ["export", "export_model", "FORMATS"]

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}


def _prepare(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return fold_batchnorm(model)


def export_model(model: nn.Module, path, fmt: str = "onnx", input_size: Sequence[int] = None,
                 meta: Optional[Dict[str, Any]] = None, opset: int = 17) -> Path:
    """Write ``model`` (eval mode, BN folded) to ``path`` as ONNX or TorchScript with a dynamic batch axis,
    and ``meta`` (preprocessing) to the JSON file beside it. ``input_size`` is (C, H, W)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_size = tuple(input_size or model.default_input_size)
    prepared = _prepare(model)
    example = torch.zeros(2, *input_size)
    # Written beside the target and renamed over it once whole: a full disk or Ctrl-C mid-write leaves the
    # previous export as it was, never a truncated file that looks like a model.
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter; correctness is checked by tests
            if fmt == "onnx":
                _export_onnx(prepared, example, partial, opset)
            else:
                with torch.no_grad():
                    traced = torch.jit.trace(prepared, example, check_trace=False)
                traced.save(str(partial))
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    info = {"format": fmt, "model_name": getattr(model, "model_name", type(model).__name__),
            "in_chans": input_size[0], "image_size": input_size[1], "input_name": "images",
            "output_name": "logits", "mean": [0.0] * input_size[0], "std": [1.0] * input_size[0],
            "classes": [str(i) for i in range(getattr(model, "num_classes", 0))]}
    info.update(meta or {})
    write_text_atomic(path.with_suffix(".json"), json.dumps(info, indent=2) + "\n")
    return path


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ValueError("ONNX export needs the onnx package: pip install 'moderncnn[export]'") from None
    kwargs = dict(input_names=["images"], output_names=["logits"], opset_version=opset,
                  dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    with torch.no_grad():
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=False, **kwargs)
        except TypeError:  # torch without the dynamo switch: the TorchScript exporter is the only one
            torch.onnx.export(model, (example,), str(path), **kwargs)




def export(source, fmt: str = "onnx", output: Optional[str] = None, opset: int = 17) -> Path:
    """Export a run directory (the checkpoint it evaluates with: best.pt where validation chose one, else
    last.pt) or a checkpoint file; by default next to it as model.onnx / model.pt."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    ckpt = resolve_checkpoint(source)
    state = read_checkpoint(ckpt)
    spec = ModelSpec.from_dict(state)
    model = build_model(state, str(ckpt))
    path = Path(output) if output else ckpt.parent / f"model{FORMATS[fmt]}"
    if path.resolve() in {ckpt.resolve(), (ckpt.parent / "last.pt").resolve(), (ckpt.parent / "best.pt").resolve()}:
        raise ValueError(f"{path}: would overwrite a checkpoint; choose another --output")
    meta = {"model_name": spec.model_name, "in_chans": spec.in_chans, "image_size": spec.image_size,
            "mean": spec.mean, "std": spec.std, "classes": spec.classes, "native_size": spec.native_size,
            "resize": spec.resize, "eval_crop": spec.eval_crop, "checkpoint": str(ckpt)}
    return export_model(model, path, fmt, (spec.in_chans, spec.image_size, spec.image_size), meta, opset)
