"""Export a trained model for serving, on PyTorch's current paths: a ``torch.export`` program (``.pt2``), ONNX
through the dynamo exporter, safetensors weights, an AOTInductor package, and TorchScript (deprecated in torch).

Every format but safetensors holds the eval-mode model with BatchNorm folded and a dynamic batch dimension;
safetensors holds the state dict as trained, for fine-tuning. The preprocessing (input size, channels,
mean/std, class names) and the model spec are written as JSON beside each file.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from .checkpoint import write_text_atomic
from .hardware import cxx_compiler
from .models.inference import fold_batchnorm
from .exported import FORMATS, exported_format, load_exported, meta_path
from .runlock import remove_stale_temporaries, temporary_name
from .runs import ModelSpec, UsageError, build_model, read_checkpoint, resolve_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["export", "export_model", "FORMATS", "ONNX_EXPORTERS", "load_exported", "exported_format", "meta_path"]

ONNX_EXPORTERS = ("dynamo", "legacy")


def _prepare(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return fold_batchnorm(model)


def _exported_program(model: nn.Module, example: torch.Tensor):
    """The eval-mode model as a ``torch.export`` program whose batch dimension is free."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        with torch.no_grad():
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds; the first line names the op
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise RuntimeError(f"{getattr(model, 'model_name', type(model).__name__)}: torch.export cannot capture "
                           f"it: {first.strip()}") from None


def _write_pt2(model, example, target: Path, opset: int, exporter: str) -> None:
    program = _exported_program(model, example)
    with warnings.catch_warnings():
        # folded convolutions share no storage with the rest; torch's grouping of weights says so at length
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        torch.export.save(program, str(target))


def _write_aoti(model, example, target: Path, opset: int, exporter: str) -> None:
    if not cxx_compiler():
        raise UsageError("--format aoti compiles the model to C++ and needs a C++ compiler (g++ or clang++), "
                         "and none was found; install one, or export --format pt2")
    from torch._inductor import aoti_compile_and_package
    aoti_compile_and_package(_exported_program(model, example), package_path=str(target))


def _write_onnx(model, example, target: Path, opset: int, exporter: str) -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UsageError("ONNX export needs the onnx package: pip install 'moderncnn[export]'") from None
    names = dict(input_names=["images"], output_names=["logits"], opset_version=opset)
    dynamo = exporter == "dynamo" and _has_dynamo_exporter()
    with torch.no_grad(), warnings.catch_warnings():
        if dynamo:
            torch.onnx.export(model, (example,), str(target), dynamo=True, dynamic_shapes=({0: "batch"},),
                              external_data=False, verbose=False, **names)
        else:
            # asked for, or the only exporter there is: its deprecation notices are known
            warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export",
                                    DeprecationWarning)
            warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
            kwargs = dict(dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, **names)
            try:
                torch.onnx.export(model, (example,), str(target), dynamo=False, **kwargs)
            except TypeError:  # torch without the dynamo switch: the TorchScript exporter is the only one
                torch.onnx.export(model, (example,), str(target), **kwargs)


def _has_dynamo_exporter() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    import inspect
    parameters = inspect.signature(torch.onnx.export).parameters
    return "dynamo" in parameters and "dynamic_shapes" in parameters  # torch 2.4 had the switch without them


def _write_torchscript(model, example, target: Path, opset: int, exporter: str) -> None:
    logger.warning("TorchScript is deprecated in torch; --format pt2 (torch.export) replaces it")
    with torch.no_grad(), warnings.catch_warnings():
        # torch's own deprecation notice (said above) and the tracer's notes on Python values it records as constants
        warnings.filterwarnings("ignore", r"`torch\.jit\.trace(_method)?` is deprecated", FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.jit.trace(model, example, check_trace=False).save(str(target))


def _write_safetensors(model, example, target: Path, opset: int, exporter: str, metadata=None) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise UsageError("safetensors export needs the safetensors package: pip install 'moderncnn[export]'") \
            from None
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(target), metadata={k: json.dumps(v) for k, v in (metadata or {}).items()})


_WRITERS: Dict[str, Callable] = {"pt2": _write_pt2, "aoti": _write_aoti, "onnx": _write_onnx,
                                 "torchscript": _write_torchscript}


def _opset_of(path: Path) -> Optional[int]:
    try:
        import onnx
        return max(o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                   if o.domain in ("", "ai.onnx"))
    except Exception:  # noqa: BLE001 - the opset is information, not a requirement
        return None


def export_model(model: nn.Module, path, fmt: str = "pt2", input_size: Sequence[int] = None,
                 meta: Optional[Dict[str, Any]] = None, opset: int = 18, onnx_exporter: str = "dynamo") -> Path:
    """Write ``model`` to ``path`` in ``fmt`` (see :data:`FORMATS`) and ``meta`` (preprocessing, model spec) to
    the JSON beside it. ``input_size`` is (C, H, W)."""
    if fmt not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if onnx_exporter not in ONNX_EXPORTERS:
        raise UsageError(f"onnx exporter must be dynamo or legacy, got {onnx_exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    input_size = tuple(input_size or model.default_input_size)
    info = {"format": fmt, "model_name": getattr(model, "model_name", type(model).__name__),
            "num_classes": getattr(model, "num_classes", None), "in_chans": input_size[0],
            "image_size": input_size[1], "input_name": "images", "output_name": "logits",
            "mean": [0.0] * input_size[0], "std": [1.0] * input_size[0], "model_kwargs": {},
            "classes": [str(i) for i in range(getattr(model, "num_classes", 0) or 0)]}
    info.update(meta or {})
    example = torch.zeros(2, *input_size)  # batch 2: an example of 1 would fix the batch dimension at 1
    # Written beside the target and renamed over it once whole: a full disk or Ctrl-C mid-write leaves the
    # previous export as it was, never a truncated file that looks like a model.
    remove_stale_temporaries(path.parent)  # what killed exports left behind
    partial = temporary_name(path, f"partial{path.suffix}")
    try:
        if fmt == "safetensors":
            _write_safetensors(model.eval(), example, partial, opset, onnx_exporter, metadata=info)
        else:
            _WRITERS[fmt](_prepare(model), example, partial, opset, onnx_exporter)
        os.replace(partial, path)
    except BaseException:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        partial.unlink(missing_ok=True)
        raise
    if fmt == "onnx":
        info.update(opset=_opset_of(path), onnx_exporter="dynamo" if onnx_exporter == "dynamo" and
                    _has_dynamo_exporter() else "legacy")
    write_text_atomic(meta_path(path), json.dumps(info, indent=2) + "\n")
    return path


def export(source, fmt: str = "pt2", output: Optional[str] = None, opset: int = 18,
           onnx_exporter: str = "dynamo") -> Path:
    """Export a run directory (the checkpoint it evaluates with: best.pt where validation chose one, else
    last.pt) or a checkpoint file; by default next to it as model.pt2, model.onnx, model.safetensors,
    model.aoti.pt2 or model.torchscript.pt."""
    if fmt not in FORMATS:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    ckpt = resolve_checkpoint(source)
    state = read_checkpoint(ckpt)
    spec = ModelSpec.from_dict(state)
    model = build_model(state, str(ckpt))
    path = Path(output) if output else ckpt.parent / f"model{FORMATS[fmt]}"
    if path.resolve() in {ckpt.resolve(), (ckpt.parent / "last.pt").resolve(), (ckpt.parent / "best.pt").resolve()}:
        raise UsageError(f"{path}: would overwrite a checkpoint; choose another --out")
    meta = {"model_name": spec.model_name, "num_classes": spec.num_classes, "model_kwargs": spec.model_kwargs,
            "in_chans": spec.in_chans, "image_size": spec.image_size, "mean": spec.mean, "std": spec.std,
            "classes": spec.classes, "native_size": spec.native_size, "resize": spec.resize,
            "eval_crop": spec.eval_crop, "dataset": spec.dataset, "checkpoint": str(ckpt)}
    return export_model(model, path, fmt, (spec.in_chans, spec.image_size, spec.image_size), meta, opset,
                        onnx_exporter)
