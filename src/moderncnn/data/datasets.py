"""Dataset readers: files -> uint8 image tensor (N x C x H x W), int64 labels, class names.

Whole datasets live in memory (Fashion-MNIST is 47 MB), so training never touches a file or runs
Python per image. Every reader validates what it reads and fails with :class:`DatasetError`, naming
the file and what is wrong, rather than loading half a dataset.
"""
from __future__ import annotations

import gzip
import os
import pickle
import zlib
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from .base import DatasetError, ImageDataset, cache_dir, normalization_stats

__all__ = ["DatasetError", "ImageDataset", "load_dataset", "DATASETS", "search_paths", "read_idx", "write_idx",
           "read_cifar10", "normalization_stats", "has_validation_folder"]

DEBIAN_DATASETS = Path("/usr/share/datasets")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Dataset names -> (torchvision class name, class names); the canonical dataset names are the keys.
DATASETS = {"fashion-mnist": ("FashionMNIST", FASHION_MNIST_CLASSES),
            "mnist": ("MNIST", MNIST_CLASSES),
            "cifar10": ("CIFAR10", CIFAR10_CLASSES),
            "imagefolder": (None, None)}
_ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
            "image-folder": "imagefolder", "folder": "imagefolder"}


# --- where data lives ------------------------------------------------------------------------------------
def canonical_name(name: str) -> str:
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return key


def search_paths(name: str, root: Optional[str] = None) -> List[Path]:
    """Directories searched for a dataset, in order: root, $MODERNCNN_DATA/<name>,
    ~/.cache/moderncnn/<name>, and /usr/share/datasets/<name> (Debian's dataset packages)."""
    paths: List[Path] = []
    if root:
        paths.append(Path(root).expanduser())
    if os.environ.get("MODERNCNN_DATA"):
        paths.append(Path(os.environ["MODERNCNN_DATA"]).expanduser() / name)
    paths.append(cache_dir() / name)
    if name in ("fashion-mnist", "mnist"):
        paths.append(DEBIAN_DATASETS / name)
    return paths


# --- IDX (MNIST, Fashion-MNIST) ------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise DatasetError(f"{path}: truncated or corrupt gzip file ({exc})") from None
    if path.suffix == ".gz":
        raise DatasetError(f"{path}: not a gzip file (no gzip header)")
    return raw


def write_idx(path: Path, array, compress: bool = True) -> Path:
    """Write unsigned bytes as an IDX file (MNIST's format; gzipped by default), e.g. to give
    ``load_dataset("mnist", root=...)`` data converted from another source."""
    array = np.ascontiguousarray(np.asarray(array), dtype=np.uint8)
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def read_idx(path: Path, expected_dims: int) -> torch.Tensor:
    """Read an IDX file (gzipped or not) of unsigned bytes with ``expected_dims`` dimensions."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: truncated IDX file ({len(data)} bytes)")
    zero, dtype_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype_code != 0x08 or ndim != expected_dims:
        magic = int.from_bytes(data[:4], "big")
        raise DatasetError(f"{path}: wrong magic number 0x{magic:08x}; expected 0x{0x800 + expected_dims:08x} "
                           f"(unsigned-byte IDX with {expected_dims} dimension{'s' if expected_dims > 1 else ''})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DatasetError(f"{path}: truncated or padded IDX data: header says {'x'.join(map(str, dims))} = "
                           f"{expected} bytes, file holds {len(data) - header}")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(array.copy())


_IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _find_file(directory: Path, stem: str) -> Optional[Path]:
    for sub in ("", "raw"):
        for suffix in (".gz", ""):
            candidate = directory / sub / (stem + suffix)
            if candidate.is_file():
                return candidate
    return None


def _idx_dirs(base: Path, tv_name: str) -> List[Path]:
    # Plain layout, or torchvision's <root>/<FashionMNIST>/raw
    return [base, base / tv_name]


def _read_idx_split(name: str, directory: Path, split: str, classes: List[str]) -> Optional[ImageDataset]:
    tv_name = DATASETS[name][0]
    image_stem, label_stem = _IDX_FILES[split]
    for d in _idx_dirs(directory, tv_name):
        image_file, label_file = _find_file(d, image_stem), _find_file(d, label_stem)
        if image_file and label_file:
            images = read_idx(image_file, 3)
            labels = read_idx(label_file, 1).long()
            if len(images) != len(labels):
                raise DatasetError(f"{image_file}: {len(images)} images but {label_file} has {len(labels)} labels")
            if len(labels) and int(labels.max()) >= len(classes):
                raise DatasetError(f"{label_file}: label {int(labels.max())} out of range 0..{len(classes) - 1}")
            return ImageDataset(images.unsqueeze(1), labels, list(classes), name, split, str(image_file))
    return None


# --- CIFAR-10 --------------------------------------------------------------------------------------------------
class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR-10's python batches contain: dicts, lists, strings, numbers and numpy arrays.
    Anything else (os.system, eval, arbitrary classes) is refused before it can run."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")


def _unpickle_cifar(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        if str(exc).startswith("refusing"):
            raise DatasetError(f"{path}: not a CIFAR-10 python batch ({exc})") from None
        raise DatasetError(f"{path}: truncated or corrupt CIFAR-10 python batch ({exc})") from None
    except (EOFError, ValueError, TypeError, IndexError, AttributeError, ImportError) as exc:
        raise DatasetError(f"{path}: truncated or corrupt CIFAR-10 python batch ({exc})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: not a CIFAR-10 python batch (top level is {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_python(directory: Path, split: str) -> Tuple[torch.Tensor, torch.Tensor, List[str], str]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for fname in names:
        path = directory / fname
        if not path.is_file():
            raise DatasetError(f"{path}: missing CIFAR-10 batch")
        batch = _unpickle_cifar(path)
        data, lab = batch.get("data"), batch.get("labels")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DatasetError(f"{path}: 'data' must be a uint8 array N x 3072")
        if lab is None or len(lab) != len(data):
            raise DatasetError(f"{path}: {len(data)} images but {0 if lab is None else len(lab)} labels")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.as_tensor(np.asarray(lab, dtype=np.int64)))
    classes = list(CIFAR10_CLASSES)
    meta = directory / "batches.meta"
    if meta.is_file():
        names_raw = _unpickle_cifar(meta).get("label_names")
        if names_raw:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names_raw]
    return torch.cat(images), torch.cat(labels), classes, str(directory / names[0])


def _cifar_binary(directory: Path, split: str) -> Tuple[torch.Tensor, torch.Tensor, List[str], str]:
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    images, labels = [], []
    for fname in names:
        path = directory / fname
        if not path.is_file():
            raise DatasetError(f"{path}: missing CIFAR-10 batch")
        raw = path.read_bytes()
        if len(raw) == 0 or len(raw) % 3073:
            raise DatasetError(f"{path}: truncated CIFAR-10 binary batch ({len(raw)} bytes is not a multiple "
                               f"of 3073 = 1 label byte + 3072 pixel bytes)")
        records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3073)
        labels.append(torch.from_numpy(records[:, 0].astype(np.int64)))
        images.append(torch.from_numpy(records[:, 1:].reshape(-1, 3, 32, 32).copy()))
    classes = list(CIFAR10_CLASSES)
    meta = directory / "batches.meta.txt"
    if meta.is_file():
        found = [line.strip() for line in meta.read_text().splitlines() if line.strip()]
        if found:
            classes = found
    return torch.cat(images), torch.cat(labels), classes, str(directory / names[0])


def read_cifar10(directory: Path, split: str = "train") -> Optional[ImageDataset]:
    """CIFAR-10 in either official layout under ``directory`` (python or binary batches)."""
    directory = Path(directory)
    for layout, reader in (("cifar-10-batches-py", _cifar_python), ("cifar-10-batches-bin", _cifar_binary)):
        for d in (directory / layout, directory):
            marker = "data_batch_1" if layout.endswith("py") else "data_batch_1.bin"
            if (d / marker).is_file() or (d / ("test_batch" + ("" if layout.endswith("py") else ".bin"))).is_file():
                images, labels, classes, source = reader(d, split)
                if len(labels) and int(labels.max()) >= len(classes):
                    raise DatasetError(f"{source}: label {int(labels.max())} out of range 0..{len(classes) - 1}")
                return ImageDataset(images, labels, classes, "cifar10", split, source)
    return None


# --- the entry point ---------------------------------------------------------------------------------------
def _not_found(name: str, paths: List[Path]) -> DatasetError:
    where = "\n  ".join(str(p) for p in paths)
    how = {
        "fashion-mnist": "apt-get install dataset-fashion-mnist (Debian/Ubuntu), or download=True (--download)",
        "mnist": "download=True (--download), or put the four IDX files in one of these directories",
        "cifar10": "download=True (--download), or extract cifar-10-python.tar.gz into one of these directories",
        "imagefolder": "pass root=DIR (--data-dir DIR) holding train/<class>/* and test/<class>/*",
    }[name]
    return DatasetError(f"{name} not found; looked in:\n  {where}\nTo get it: {how}")


def load_dataset(name: str, root: Optional[str] = None, split: str = "train", download: bool = False,
                 image_size=None, channels: Optional[int] = None, val_fraction: Optional[float] = None,
                 seed: int = 0, **folder_options) -> ImageDataset:
    """Load one split of a dataset into memory.

    Args:
        name: "fashion-mnist", "mnist", "cifar10" or "imagefolder".
        root: directory to look in first (required for "imagefolder").
        split: "train" or "test".
        download: fetch Fashion-MNIST/MNIST/CIFAR-10 with torchvision (checksummed) into
            ``root`` or ~/.cache/moderncnn/<name> when not found.
        image_size, channels: image folders only: resize to this size, force 1 or 3 channels.
        val_fraction: image folders without train/ and test/: hold out this seeded fraction as "test".
        folder_options: image folders only: ``workers`` (decoding processes, default all cores), ``cache``
            ("auto", "memory", "disk"), ``cache_root``, ``resize`` ("crop", "squash", "pad"), ``strict``
            (see :func:`moderncnn.data.folder.read_image_folder`).
    """
    name = canonical_name(name)
    if split == "val" and name != "imagefolder":
        raise DatasetError(f"{name} has no validation split of its own; hold one out with val_split")
    if split not in ("train", "test", "val"):
        raise DatasetError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if name == "imagefolder":
        return _load_image_folder(root, split, image_size, channels, val_fraction, seed, **folder_options)
    paths = search_paths(name, root)
    for directory in paths:
        if not directory.is_dir():
            continue
        found = (read_cifar10(directory, split) if name == "cifar10"
                 else _read_idx_split(name, directory, split, DATASETS[name][1]))
        if found is not None:
            return found
    if download:
        target = Path(root).expanduser() if root else cache_dir() / name
        _download(name, target)
        found = (read_cifar10(target, split) if name == "cifar10"
                 else _read_idx_split(name, target, split, DATASETS[name][1]))
        if found is not None:
            return found
    raise _not_found(name, paths)


def _download(name: str, target: Path) -> None:
    """Fetch with torchvision's dataset classes: their mirrors, their MD5 checksums."""
    import torchvision.datasets as tvd
    target.mkdir(parents=True, exist_ok=True)
    cls = getattr(tvd, DATASETS[name][0])
    try:
        cls(root=str(target), train=True, download=True)
    except (RuntimeError, OSError) as exc:
        # Keep nothing that failed its checksum: a later run must not mistake it for the dataset.
        from torchvision.datasets.utils import check_integrity
        raw = target / (cls.base_folder if hasattr(cls, "base_folder") else Path(cls.__name__) / "raw")
        for resource in getattr(cls, "resources", []):
            filename, md5 = (resource[0], resource[1]) if isinstance(resource, tuple) else (None, None)
            if filename and (raw / filename).exists() and not check_integrity(str(raw / filename), md5):
                (raw / filename).unlink()
        raise DatasetError(f"downloading {name} into {target} failed: {exc}") from None


def has_validation_folder(root) -> bool:
    """Whether an image-folder dataset brings its own validation set (``root/val`` beside ``root/train``)."""
    return bool(root) and (Path(root).expanduser() / "train").is_dir() and (Path(root).expanduser() / "val").is_dir()


def _load_image_folder(root, split, image_size, channels, val_fraction, seed, **options) -> ImageDataset:
    """One split of an image folder: DIR/train, DIR/test (or DIR/val as the test set where there is no
    test/), DIR/val (split "val"), or a seeded ``val_fraction`` of DIR/train (or DIR) as the test set."""
    from .folder import list_class_folders, read_image_folder
    if not root:
        raise _not_found("imagefolder", [])
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder not found")
    read = dict(image_size=image_size, channels=channels, **options)
    if split == "val":
        if not has_validation_folder(root):
            raise DatasetError(f"{root}: no val/ folder beside train/")
        return read_image_folder(root / "val", split_name="val", classes=list_class_folders(root / "train")[0], **read)
    if (root / "train").is_dir() and val_fraction is None:
        split_dir, classes = root / split, None
        if split == "test":
            classes = list_class_folders(root / "train")[0]
            if not split_dir.is_dir():
                split_dir = root / "val"
                if not split_dir.is_dir():
                    raise DatasetError(f"{root}: has train/ but neither test/ nor val/; pass val_fraction")
        return read_image_folder(split_dir, split_name=split, classes=classes, **read)
    base = root / "train" if (root / "train").is_dir() else root
    full = read_image_folder(base, split_name=split, **read)
    fraction = 0.2 if val_fraction is None else float(val_fraction)
    if not 0 < fraction < 1:
        raise DatasetError(f"val_fraction must be between 0 and 1, got {fraction}")
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(len(full) * fraction)))
    return full.take((perm[:n_test] if split == "test" else perm[n_test:]).sort().values)
