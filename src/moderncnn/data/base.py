"""What every reader returns: :class:`ImageDataset` (uint8 images N x C x H x W, int64 labels, class names), the
error a reader raises (:class:`DatasetError`), per-channel statistics and the cache directory."""
from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

__all__ = ["DatasetError", "ImageDataset", "normalization_stats", "cache_dir"]


class DatasetError(ValueError):
    """A dataset file or folder that cannot be read as what it claims to be."""


@dataclass
class ImageDataset:
    """A whole split: its decoded images in memory, or memory-mapped from an image folder's cache.

    Attributes:
        images: uint8 tensor N x C x H x W.
        labels: int64 tensor N.
        classes: class names, index = label.
        name: dataset name ("fashion-mnist", "imagefolder", ...).
        split: "train", "val" or "test".
        source: where it was read from.
        storage: "memory", or "disk" where ``images`` maps an image folder's cache file.
        skipped: the files an image folder could not decode, each with the reason.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: List[str]
    name: str
    split: str = "train"
    source: str = ""
    storage: str = "memory"
    skipped: List[str] = field(default_factory=list)
    mapped: Optional[np.ndarray] = field(default=None, repr=False)  # the np.memmap behind a "disk" split
    files_signature: str = ""  # an image folder's hash of its files' paths, sizes and times (its cache key)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(f"{self.source}: images must be uint8 N x C x H x W, got {self.images.dtype} "
                               f"{tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{self.source}: {len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise DatasetError(f"{self.source}: label {int(self.labels.max())} out of range for "
                               f"{len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def subset(self, n: int, seed: int = 0) -> "ImageDataset":
        """At most ``n`` samples, drawn at random (seeded) so that every class keeps its share."""
        if n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n].sort().values
        return self.take(idx)

    def take(self, index: torch.Tensor, split: Optional[str] = None) -> "ImageDataset":
        """The samples at ``index`` (in that order), as split ``split`` (default: this one's)."""
        return ImageDataset(self.images[index], self.labels[index], self.classes, self.name, split or self.split,
                            self.source, skipped=list(self.skipped))

    def fingerprint(self) -> Dict[str, Any]:
        """What identifies this split's data, for a resume to check it is unchanged: an image folder's file count
        and the hash of its files' paths, sizes and modification times; elsewhere the image count and a
        SHA-256 of the decoded images and labels."""
        if self.files_signature:
            return {"source": self.source, "images": len(self), "files_sha256": self.files_signature}
        digest = hashlib.sha256()
        for start in range(0, len(self), 8192):
            digest.update(self.images[start:start + 8192].contiguous().numpy().tobytes())
        digest.update(self.labels.numpy().astype(np.int64).tobytes())
        return {"source": self.source, "images": len(self), "sha256": digest.hexdigest()}

    def release_pages(self) -> None:
        """A memory-mapped split: drop this process's resident pages of the map (the page cache keeps them),
        so that the memory a process holds for the data stays bounded however much of the file it reads."""
        mapping = getattr(self.mapped, "_mmap", None)
        if mapping is not None and hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            mapping.madvise(mmap.MADV_DONTNEED)

    def split_validation(self, size: float, seed: int = 0) -> Tuple["ImageDataset", "ImageDataset"]:
        """(training, validation): a seeded, class-stratified hold-out of ``size`` samples (a count), or of
        that share of them (a fraction below 1). Every class gives its share (largest remainders), and
        must keep at least one training sample."""
        n = len(self)
        if not size > 0:
            raise DatasetError(f"val_split must be positive (a count, or a fraction below 1), got {size:g}")
        total = int(round(size * n)) if size < 1 else int(size)
        if not 0 < total < n:
            raise DatasetError(f"val_split {size:g} holds out {total} of the {n:,} training images; "
                               f"it must leave some in each set")
        counts = torch.bincount(self.labels, minlength=self.num_classes)
        share = counts.double() * total / n
        quota = share.floor().long()
        by_remainder = torch.argsort(share - quota, descending=True, stable=True)
        quota[by_remainder[:total - int(quota.sum())]] += 1
        starved = [(self.classes[c], int(counts[c])) for c in range(self.num_classes) if counts[c] and quota[c] >= counts[c]]
        if starved:
            name, count = starved[0]
            raise DatasetError(f"val_split {size:g} leaves no training image in class {name!r} ({count} image"
                               f"{'s' if count != 1 else ''}); hold out fewer")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        ranked = order[torch.argsort(self.labels[order], stable=True)]  # by class, shuffled within each
        starts = torch.cumsum(counts, 0) - counts
        held = torch.cat([ranked[s:s + q] for s, q in zip(starts.tolist(), quota.tolist())])
        keep = torch.ones(n, dtype=torch.bool)
        keep[held] = False
        return self.take(keep.nonzero().flatten()), self.take(held.sort().values, split="val")

    def __repr__(self) -> str:
        return (f"ImageDataset({self.name!r}, split={self.split!r}, n={len(self)}, shape={self.image_shape}, "
                f"classes={len(self.classes)})")


def normalization_stats(images: torch.Tensor, chunk_bytes: int = 64 << 20,
                        after_chunk=None) -> Tuple[List[float], List[float]]:
    """Per-channel mean and std of uint8 images, scaled to [0, 1] (computed in float64, in chunks of about
    ``chunk_bytes``; ``after_chunk()`` runs after each, e.g. to release a memory map's pages)."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    chunk = max(1, chunk_bytes // (8 * max(1, images[0].numel()))) if len(images) else 1
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64).div_(255)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
        if after_chunk is not None:
            after_chunk()
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def cache_dir() -> Path:
    return Path(os.environ.get("MODERNCNN_CACHE", Path.home() / ".cache" / "moderncnn"))
