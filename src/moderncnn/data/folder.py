"""Image folders (``DIR/<class>/<image files>``): decoded once, in parallel, into a cache of uint8 arrays.

A folder's cache is a directory holding ``images.npy`` (N x C x H x W), ``labels.npy`` and ``meta.json``
(classes, files, skipped files), written atomically under ``$MODERNCNN_CACHE/imagefolder`` (or
``cache_dir``) and keyed by every file's path, size and modification time and the resize settings. It is
read into memory, or memory-mapped (``mmap_mode="r"``) when the decoded split would take more than a
quarter of the machine's RAM (``cache="auto"``); the loader gathers batches from either alike.

Images are resized as torchvision does by default (``crop``: the shorter side to the target, then the
centre), squashed to the target (``squash``), or fitted inside it on black (``pad``). Files that cannot be
decoded (truncated, empty, not images, decompression bombs past PIL's limit) are skipped and named, or,
with ``strict=True``, the first one is an error.
"""
from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import shutil
import tempfile
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from ..runlock import process_alive
from .base import DatasetError, ImageDataset, cache_dir

__all__ = ["RESIZE_MODES", "CACHE_MODES", "IMAGE_EXTENSIONS", "read_image_folder", "decode_image",
           "list_class_folders", "resize_image"]

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
RESIZE_MODES = ("crop", "squash", "pad")
CACHE_MODES = ("auto", "memory", "disk")
_GREY_MODES = {"L", "1", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_CACHE_VERSION = "v2"
_CHUNK = 256  # files per task of the decoding pool


def list_class_folders(directory: Path, classes: Optional[List[str]] = None) -> Tuple[List[str], List[Tuple[Path, int]]]:
    """(class names, [(file, label)]) of ``directory/<class>/*``. ``classes`` (the training split's) sets
    the labels of a test or validation folder, which may lack a class but not add one."""
    found = sorted(d.name for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DatasetError(f"{directory}: no class folders (expected {directory}/<class>/<image files>)")
    if classes is None:
        if len(found) < 2:
            raise DatasetError(f"{directory}: one class folder ({found[0]}); a classifier needs at least 2 classes")
        classes = found
    extra = [c for c in found if c not in classes]
    if extra:
        raise DatasetError(f"{directory}: class folder {extra[0]!r} is not among the training classes "
                           f"({', '.join(classes)})")
    samples = []
    for cls in found:
        files = sorted(p for p in (directory / cls).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DatasetError(f"{directory / cls}: empty class folder (no image files)")
        samples += [(p, classes.index(cls)) for p in files]
    return list(classes), samples


def resize_image(img, size: Tuple[int, int], mode: str = "crop"):
    """``img`` (PIL) at ``size`` (H, W): ``crop`` scales the shorter side to fit and cuts the centre,
    ``squash`` scales each side, ``pad`` scales the longer side to fit and centres it on black."""
    from PIL import Image
    th, tw = size
    w, h = img.size
    if (w, h) == (tw, th):
        return img
    if mode == "squash":
        return img.resize((tw, th), Image.BILINEAR)
    scale = max(tw / w, th / h) if mode == "crop" else min(tw / w, th / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    if mode == "crop":
        left, top = (nw - tw) // 2, (nh - th) // 2
        return img.crop((left, top, left + tw, top + th))
    canvas = Image.new(img.mode, (tw, th))
    canvas.paste(img, ((tw - nw) // 2, (th - nh) // 2))
    return canvas


def _to_channels(img, channels: int):
    """Grey, RGBA, palette and 16-bit images as 8-bit grey (1) or RGB (3)."""
    from PIL import Image
    if img.mode.startswith("I") or img.mode == "F":  # 16-bit (or 32-bit) values: keep the top 8 bits
        array = np.asarray(img, dtype=np.float64)
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
        img = Image.fromarray((array.clip(0, top) * (255.0 / top)).round().astype(np.uint8), "L")
    elif img.mode == "P":
        img = img.convert("RGBA")
    return img.convert("L" if channels == 1 else "RGB")


def decode_image(path: Path, channels: int, size: Optional[Tuple[int, int]], resize: str = "crop") -> np.ndarray:
    """One image file as a C x H x W uint8 array, or :class:`DatasetError` saying why it cannot be read."""
    from PIL import Image, UnidentifiedImageError
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # past PIL's limit: skipped
            with Image.open(path) as img:
                img.load()
                img = _to_channels(img, channels)
        if size is not None:
            img = resize_image(img, size, resize)
        array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise DatasetError(f"{path}: unreadable image ({str(exc).strip() or type(exc).__name__})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _decode_chunk(task) -> Tuple[int, List[str]]:
    """A pool task: decode the files into their rows of the cache file (the worker writes them itself, so
    no pixels cross between processes); returns the first row and, per file, why it failed ("" if not)."""
    paths, start, channels, size, resize, npy = task
    images = np.load(npy, mmap_mode="r+")
    reasons = []
    for offset, path in enumerate(paths):
        try:
            images[start + offset] = decode_image(Path(path), channels, size, resize)
            reasons.append("")
        except DatasetError as exc:
            reasons.append(str(exc))
    _release_written(images)
    return start, reasons


def _probe(samples, channels, size) -> Tuple[int, Tuple[int, int]]:
    """The channels (1 when every image is grey) and size (all must agree) a folder decodes to by default."""
    from PIL import Image
    modes, sizes = set(), Counter()
    for path, _ in samples:
        try:
            with Image.open(path) as img:
                modes.add(img.mode)
                sizes[(img.size[1], img.size[0])] += 1
        except Exception:  # unreadable files are skipped (or refused) when decoded
            continue
    channels = channels or (1 if modes and modes <= _GREY_MODES else 3)
    if size is None:
        if len(sizes) > 1:
            raise DatasetError(f"images have {len(sizes)} different sizes (most common "
                               f"{sizes.most_common(1)[0][0]}); pass image_size to resize them")
        size = next(iter(sizes)) if sizes else (1, 1)
    return channels, size


def _signature(directory: Path, samples, settings: str) -> str:
    h = hashlib.sha256(f"{directory}|{settings}|{_CACHE_VERSION}".encode())
    for path, label in samples:
        st = path.stat()
        h.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def _compact(target: Path, keep: np.ndarray) -> None:
    """Drop the rows of skipped files from images.npy, a chunk at a time."""
    full = np.load(target / "images.npy", mmap_mode="r")
    rows = np.flatnonzero(keep)
    small = np.lib.format.open_memmap(target / "compact.npy", mode="w+", dtype=np.uint8,
                                      shape=(len(rows), *full.shape[1:]))
    for start in range(0, len(rows), 4096):
        small[start:start + 4096] = full[rows[start:start + 4096]]
        _release_written(small)
    del small, full
    os.replace(target / "compact.npy", target / "images.npy")


def _reserve(path: Path) -> None:
    """Allocate every block of ``path`` (a sparse file) on the disk, or fail naming the space it needs."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDWR)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # a file system without it: the map fills it
                return
            raise
        free = shutil.disk_usage(path.parent).free
        raise DatasetError(f"no space left on {path.parent.parent} for the decoded image cache (needs "
                           f"{size / 2 ** 20:,.0f} MB, {free / 2 ** 20:,.0f} MB free); free some space or pass "
                           f"--cache-dir elsewhere") from None
    finally:
        os.close(fd)


def _remove_dead_builds(parent: Path) -> None:
    """The .building-<pid>-* directories of decodes whose process died (killed mid-build)."""
    try:
        entries = list(parent.glob(".building-*"))
    except OSError:
        return
    for entry in entries:
        pid = entry.name.split("-")[1] if entry.name.count("-") >= 2 else ""
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _decode_all(samples, channels: int, size, resize: str, workers: int, strict: bool, target: Path) -> List[str]:
    """Decode every file into ``target``/images.npy and labels.npy with ``workers`` processes; returns the
    skipped files' reasons (``strict``: the first bad file is an error instead)."""
    npy = target / "images.npy"
    # The file is made at its full size here and its blocks reserved, so that a full disk is an error now
    # rather than a SIGBUS when a worker writes into a hole of the map; the workers fill its rows.
    np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(len(samples), channels, *size)).flush()
    _reserve(npy)
    paths = [str(p) for p, _ in samples]
    tasks = [(paths[i:i + _CHUNK], i, channels, size, resize, str(npy)) for i in range(0, len(paths), _CHUNK)]
    keep, skipped = np.ones(len(samples), dtype=bool), []
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(tasks) > 1 else None
    try:
        for start, reasons in (pool.map(_decode_chunk, tasks) if pool else map(_decode_chunk, tasks)):
            for offset, reason in enumerate(reasons):
                if reason:
                    if strict:
                        raise DatasetError(f"{reason} (strict data: the first bad file stops the run)")
                    keep[start + offset] = False
                    skipped.append(reason)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if not keep.all():
        _compact(target, keep)
    labels = np.asarray([label for (_, label), kept in zip(samples, keep) if kept], dtype=np.int64)
    np.save(target / "labels.npy", labels)
    return skipped


def _release_written(images: np.memmap) -> None:
    """Write the decoded rows to the file and drop them from this process's memory (the page cache keeps
    them): decoding a folder larger than the RAM holds only one chunk at a time."""
    images.flush()
    mapping = getattr(images, "_mmap", None)
    if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _open(entry: Path, cache: str, split_name: str, source: str, signature: str = "") -> ImageDataset:
    """The cached split in memory, or memory-mapped from the .npy file (``cache="auto"``: memory when it takes
    under a quarter of the RAM)."""
    meta = json.loads((entry / "meta.json").read_text())
    images = np.load(entry / "images.npy", mmap_mode="r")
    storage = cache if cache != "auto" else ("memory" if images.nbytes < _ram_bytes() / 4 else "disk")
    if storage == "memory":
        tensor = torch.from_numpy(np.array(images))
    else:
        with warnings.catch_warnings():  # read-only by design: batches are gathered, never written
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            tensor = torch.from_numpy(images)
    labels = torch.from_numpy(np.load(entry / "labels.npy"))
    return ImageDataset(tensor, labels, list(meta["classes"]), "imagefolder", split_name, source, storage=storage,
                        skipped=list(meta["skipped"]), mapped=images if storage == "disk" else None,
                        files_signature=signature)


def _check_classes(directory: Path, classes: List[str], samples, labels: torch.Tensor) -> None:
    present = sorted({label for _, label in samples})
    kept = set(labels.tolist())
    for label in present:
        if label not in kept:
            raise DatasetError(f"{directory / classes[label]}: no readable image left in this class folder")


def _warn_skipped(directory: Path, skipped: List[str]) -> None:
    if skipped:
        shown = "; ".join(skipped[:10])
        more = f"; and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        warnings.warn(f"{directory}: skipped {len(skipped)} unreadable file{'s' if len(skipped) != 1 else ''}: "
                      f"{shown}{more}", stacklevel=3)


def _build(entry: Path, samples, classes, channels, size, resize, workers, strict, use_cache) -> Path:
    """Decode into a fresh directory beside ``entry`` and rename it into place (readers see a whole cache or
    none); without ``use_cache`` the directory is a temporary one the caller removes."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(entry.parent)
    building = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".building-{os.getpid()}-"))
    try:
        skipped = _decode_all(samples, channels, size, resize, workers, strict, building)
        (building / "meta.json").write_text(json.dumps({
            "classes": classes, "files": [str(p) for p, _ in samples], "skipped": skipped,
            "channels": channels, "size": list(size), "resize": resize, "version": _CACHE_VERSION}))
        if not use_cache:
            return building
        try:
            os.replace(building, entry)
        except OSError:  # another process built it meanwhile: theirs is the same
            shutil.rmtree(building, ignore_errors=True)
        return entry
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise


def read_image_folder(directory: Path, image_size=None, channels: Optional[int] = None, use_cache: bool = True,
                      split_name: str = "train", classes: Optional[List[str]] = None, workers: Optional[int] = None,
                      cache: str = "auto", resize: str = "crop", strict: bool = False,
                      cache_root: Optional[Path] = None) -> ImageDataset:
    """Decode ``directory/<class>/*`` once (``workers`` processes, default all cores) to ``image_size``
    (int or (H, W); default: the images' own size, which must then agree) and ``channels`` (1, 3, or None:
    1 when every image is grey). ``cache``: "memory", "disk" (memory-mapped) or "auto"."""
    if resize not in RESIZE_MODES:
        raise DatasetError(f"resize must be {', '.join(RESIZE_MODES)}, got {resize!r}")
    if cache not in CACHE_MODES:
        raise DatasetError(f"data cache must be {', '.join(CACHE_MODES)}, got {cache!r}")
    directory = Path(directory).expanduser().resolve()
    classes, samples = list_class_folders(directory, classes)
    size = (image_size, image_size) if isinstance(image_size, int) else (tuple(image_size) if image_size else None)
    if channels is None or size is None:
        try:
            channels, size = _probe(samples, channels, size)
        except DatasetError as exc:
            raise DatasetError(f"{directory}: {exc}") from None
    key = _signature(directory, samples, f"{size}|{channels}|{resize}")
    entry = Path(cache_root or cache_dir()) / "imagefolder" / key
    if use_cache and (entry / "meta.json").is_file():
        try:
            dataset = _open(entry, cache, split_name, str(directory), key)
        except (OSError, ValueError, KeyError):  # a damaged cache is rebuilt, never trusted
            shutil.rmtree(entry, ignore_errors=True)
        else:
            if strict and dataset.skipped:
                raise DatasetError(f"{dataset.skipped[0]} (strict data: the first bad file stops the run)")
            _check_classes(directory, classes, samples, dataset.labels)
            _warn_skipped(directory, dataset.skipped)
            return dataset
    built = _build(entry, samples, classes, channels, size, resize, workers or os.cpu_count() or 1, strict,
                   use_cache)
    dataset = _open(built, cache if use_cache else "memory", split_name, str(directory), key)
    if not use_cache:
        shutil.rmtree(built, ignore_errors=True)
    _check_classes(directory, classes, samples, dataset.labels)
    _warn_skipped(directory, dataset.skipped)
    return dataset
