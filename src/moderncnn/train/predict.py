"""Predict classes of image files with a trained run, a checkpoint or an exported ONNX model, using the
training-time preprocessing (channels, size, mean/std)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence, Tuple

import torch

__all__ = ["predict_files", "load_images"]


def load_images(paths: Sequence[str], channels: int, size: int, mean, std, native_size=None) -> torch.Tensor:
    """Read image files exactly as training saw them: decoded and resized with PIL to the dataset's
    stored size (``native_size``: 28x28 for Fashion-MNIST, the folder's image size for image folders),
    then resized on tensors to ``size`` and normalised, as the loader does."""
    from ..data.datasets import DatasetError, _decode
    from ..data.loader import resize
    native = tuple(native_size) if native_size else (size, size)
    batch = []
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such image file")
        try:
            array = _decode(Path(path), channels, native)
        except DatasetError as exc:
            raise ValueError(str(exc)) from None
        batch.append(torch.from_numpy(array.copy()))
    x = resize(torch.stack(batch).float().div_(255), (size, size))
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std


def predict_files(source: str, images: Sequence[str], top_k: int = 3, device: str = "cpu"
                  ) -> List[Tuple[str, List[Tuple[str, float]]]]:
    source_path = Path(source)
    if source_path.suffix == ".onnx":
        return _predict_onnx(source_path, images, top_k)
    from .checkpoint import load_checkpoint, resolve_checkpoint
    from .engine import build_model_from_checkpoint
    path = resolve_checkpoint(source)
    state = load_checkpoint(path)
    model = build_model_from_checkpoint(state, str(path)).to(device)
    norm = state["normalization"]
    x = load_images(images, state["in_chans"], state["image_size"], norm["mean"], norm["std"],
                    state.get("native_size")).to(device)
    with torch.no_grad():
        probs = model(x).softmax(1).cpu()
    return _top(images, probs, state["classes"], top_k)


def _top(images, probs: torch.Tensor, classes, top_k: int):
    k = min(top_k, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [(str(p), [(classes[int(i)], float(v)) for v, i in zip(vs, idx)])
            for p, vs, idx in zip(images, values, indices)]


def _predict_onnx(path: Path, images, top_k: int):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError("predicting with an ONNX file needs onnxruntime: pip install 'moderncnn[export]'") from None
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise ValueError(f"{meta_path}: missing (the preprocessing written beside the exported model)")
    meta = json.loads(meta_path.read_text())
    x = load_images(images, meta["in_chans"], meta["image_size"], meta["mean"], meta["std"],
                    meta.get("native_size")).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    probs = torch.from_numpy(logits).softmax(1)
    return _top(images, probs, meta["classes"], top_k)
