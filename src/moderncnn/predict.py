"""Use a trained model: score it on a dataset's test split, or predict the classes of image files (with a
run, a checkpoint or an exported ONNX model), with the training-time preprocessing (channels, size,
mean/std)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from .exported import export_meta, exported_format, load_exported
from .runs import ModelSpec, build_model, read_checkpoint, resolve_checkpoint

__all__ = ["predict_files", "predict_paths", "expand_paths", "load_images", "evaluate_checkpoint", "Evaluation",
           "Predictions"]


def load_images(paths: Sequence[str], channels: int, size: int, mean, std, native_size=None,
                resize_mode: str = "crop", eval_crop: bool = False) -> torch.Tensor:
    """Read image files exactly as training saw them: decoded and resized with PIL to the dataset's
    stored size (``native_size``: 28x28 for Fashion-MNIST, the folder's image size for image folders) the
    way the run's folders were (``resize_mode``: centre crop, squash or pad), then resized on tensors to
    ``size`` (or, with ``eval_crop``, cut to its centre) and normalised, as the loader does."""
    from .data.datasets import DatasetError
    from .data.folder import decode_image
    from .data.loader import center_crop, resize
    native = tuple(native_size) if native_size else (size, size)
    batch = []
    for path in paths:
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such image file")
        try:
            array = decode_image(Path(path), channels, native, resize_mode)
        except DatasetError as exc:
            raise ValueError(str(exc)) from None
        batch.append(torch.from_numpy(array.copy()))
    x = torch.stack(batch).float().div_(255)
    x = center_crop(x, (size, size)) if eval_crop else resize(x, (size, size))
    mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean) / std


@dataclass
class Evaluation:
    model: str
    dataset: str
    images: int
    loss: float
    accuracy: float
    checkpoint: Path


def evaluate_checkpoint(source, dataset: Optional[str] = None, data_dir: Optional[str] = None,
                        subset: Optional[int] = None, batch_size: int = 256, tta: int = 0,
                        device: str = "auto", tta_below: float = 1.0) -> Evaluation:
    """Test loss and accuracy of a run (the checkpoint it evaluates with) or a checkpoint file, on its own
    dataset's test split or on ``dataset`` / ``data_dir``, preprocessed as in training; ``tta`` and
    ``tta_below`` as in :func:`~moderncnn.training.loop.evaluate`."""
    from .data import Loader, load_dataset
    from .training.loop import evaluate
    from .training.resolve import pick_device
    device = pick_device(device)
    if _exported(source):
        path, (spec, config, model) = Path(source), _exported_for_evaluation(Path(source))
        device = torch.device("cpu")  # exported programs run where they were exported: the CPU
    else:
        path = resolve_checkpoint(source)
        state = read_checkpoint(path)
        spec, config = ModelSpec.from_dict(state), state.get("config") or {}
        model = build_model(state, str(path)).to(device)
    dataset = dataset or spec.dataset or config.get("dataset")
    kwargs = {}
    if dataset == "imagefolder":
        kwargs = dict(image_size=tuple(spec.native_size or (spec.image_size, spec.image_size)),
                      val_fraction=config.get("val_fraction"), seed=config.get("seed", 0), channels=spec.in_chans,
                      resize=spec.resize)
    test = load_dataset(dataset, root=data_dir or config.get("data_dir"), split="test", **kwargs)
    if subset:
        test = test.subset(subset, seed=config.get("seed", 0))
    if list(test.classes) != list(spec.classes):
        raise ValueError(f"{dataset} test classes {list(test.classes)} differ from the classes {path} was trained "
                         f"on {list(spec.classes)}")
    if test.images.shape[1] != spec.in_chans:
        raise ValueError(f"{dataset} has {test.images.shape[1]}-channel images; the model was trained on "
                         f"{spec.in_chans}-channel images")
    loader = Loader(test, batch_size, train=False, image_size=spec.image_size, device=device, mean=spec.mean,
                    std=spec.std, eval_crop=spec.eval_crop)
    loss, acc = evaluate(model, loader, tta=tta, tta_below=tta_below)
    return Evaluation(spec.model_name, dataset, len(test), loss, acc, path)


class _ExportedModel(torch.nn.Module):
    """An exported model's function as a module that :func:`~moderncnn.training.loop.evaluate` can score."""

    def __init__(self, path: Path, fmt: str):
        super().__init__()
        if fmt == "onnx":
            runtime = _onnx_runtime(path)
            fn = lambda x: torch.from_numpy(runtime.run(None, {runtime.get_inputs()[0].name: x.numpy()})[0])  # noqa
        else:
            fn = load_exported(path)
        object.__setattr__(self, "_run", fn)  # not a submodule: exported programs refuse .eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x.contiguous())


def _exported_for_evaluation(path: Path):
    """(model spec, the training config where its checkpoint still exists, the model) of an exported file."""
    meta = export_meta(path)
    spec = ModelSpec.from_dict(meta)
    config = {}
    if meta.get("checkpoint") and Path(meta["checkpoint"]).is_file():
        try:
            config = read_checkpoint(meta["checkpoint"]).get("config") or {}
        except ValueError:
            config = {}
    return spec, config, _ExportedModel(path, _exported(path))


def expand_paths(paths: Sequence[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """(image files, failures): each path is a file, a directory (its image files, recursively, sorted) or a
    glob; a missing path, an empty directory or a glob matching nothing is a failure naming it."""
    import glob
    from .data.folder import IMAGE_EXTENSIONS
    files, failures = [], []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            files += found
            if not found:
                failures.append((text, "no image files in this directory"))
        elif path.is_file():
            files.append(text)
        elif glob.has_magic(text):
            found = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
            files += found
            if not found:
                failures.append((text, "no file matches this pattern"))
        else:
            failures.append((text, "no such file or directory"))
    return files, failures


@dataclass
class Predictions:
    """What :func:`predict_paths` found: (path, [(class, probability), ...]) per image read, and (path,
    reason) per path that failed."""

    results: List[Tuple[str, List[Tuple[str, float]]]]
    failures: List[Tuple[str, str]]


def _readable(files: Sequence[str], spec_or_meta) -> Tuple[List[str], List[Tuple[str, str]]]:
    from .data.datasets import DatasetError
    from .data.folder import decode_image
    good, bad = [], []
    for path in files:
        try:
            decode_image(Path(path), spec_or_meta[0], spec_or_meta[1])
            good.append(path)
        except DatasetError as exc:
            bad.append((path, str(exc).split(": ", 1)[-1]))
    return good, bad


def predict_paths(source: str, paths: Sequence[str], top_k: int = 3, device: str = "cpu") -> Predictions:
    """Predict every image file among ``paths`` (files, directories, globs); files that cannot be read are
    reported in ``failures`` while the others are still predicted."""
    files, failures = expand_paths(paths)
    channels, native = _input_format(source)
    good, unreadable = _readable(files, (channels, native))
    results = predict_files(source, good, top_k=top_k, device=device) if good else []
    return Predictions(results, failures + unreadable)


def _input_format(source) -> Tuple[int, Optional[tuple]]:
    """(channels, stored image size) the model's training data had, from a run, checkpoint or exported file."""
    if _exported(source):
        meta = export_meta(Path(source))
        size = meta.get("native_size") or [meta["image_size"]] * 2
        return meta["in_chans"], tuple(size)
    _expect_checkpoint(Path(source))
    spec = ModelSpec.from_dict(read_checkpoint(resolve_checkpoint(source)))
    return spec.in_chans, tuple(spec.native_size or (spec.image_size, spec.image_size))


def _exported(source) -> Optional[str]:
    """The export format of ``source`` (pt2, onnx, safetensors, aoti, torchscript), None for runs and checkpoints."""
    return exported_format(source) if Path(source).is_file() else None


def predict_files(source: str, images: Sequence[str], top_k: int = 3, device: str = "cpu"
                  ) -> List[Tuple[str, List[Tuple[str, float]]]]:
    """(path, [(class, probability), ...]) for each image, from a run directory, a checkpoint or an exported
    model (.pt2, .onnx, .safetensors, .aoti.pt2, TorchScript)."""
    source_path = Path(source)
    fmt = _exported(source)
    if fmt == "onnx":
        return _predict_onnx(source_path, images, top_k)
    if fmt is not None:
        return _predict_exported(source_path, images, top_k)
    _expect_checkpoint(source_path)
    path = resolve_checkpoint(source)
    state = read_checkpoint(path)
    spec = ModelSpec.from_dict(state)
    model = build_model(state, str(path)).to(device)
    x = load_images(images, spec.in_chans, spec.image_size, spec.mean, spec.std, spec.native_size,
                    spec.resize, spec.eval_crop).to(device)
    with torch.no_grad():
        probs = model(x).softmax(1).cpu()
    return _top(images, probs, spec.classes, top_k)


def _expect_checkpoint(path: Path) -> None:
    """A file that is neither an export nor a checkpoint: say what predict takes."""
    if path.is_file() and path.suffix not in (".pt", ".pth", ".ckpt"):
        raise ValueError(f"{path}: not a model moderncnn reads; expected a run directory, a checkpoint (.pt) or an "
                         f"exported model (.pt2, .onnx, .safetensors, .aoti.pt2, .torchscript.pt)")


def _top(images, probs: torch.Tensor, classes, top_k: int):
    k = min(top_k, probs.shape[1])
    values, indices = probs.topk(k, dim=1)
    return [(str(p), [(classes[int(i)], float(v)) for v, i in zip(vs, idx)])
            for p, vs, idx in zip(images, values, indices)]


def _exported_inputs(path: Path, images) -> Tuple[torch.Tensor, dict]:
    meta = export_meta(path)
    x = load_images(images, meta["in_chans"], meta["image_size"], meta["mean"], meta["std"],
                    meta.get("native_size"), meta.get("resize", "squash"), meta.get("eval_crop", False))
    return x, meta


def _predict_exported(path: Path, images, top_k: int):
    x, meta = _exported_inputs(path, images)
    model = load_exported(path)
    with torch.no_grad():
        probs = model(x).float().softmax(1)
    return _top(images, probs, meta["classes"], top_k)


def _onnx_runtime(path: Path):
    try:
        import onnxruntime as ort
    except ImportError:
        raise ValueError("running an ONNX file needs onnxruntime: pip install 'moderncnn[export]'") from None
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _predict_onnx(path: Path, images, top_k: int):
    x, meta = _exported_inputs(path, images)
    x = x.numpy()
    runtime = _onnx_runtime(path)
    logits = runtime.run(None, {runtime.get_inputs()[0].name: x})[0]
    probs = torch.from_numpy(logits).softmax(1)
    return _top(images, probs, meta["classes"], top_k)
