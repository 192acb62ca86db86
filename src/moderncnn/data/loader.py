"""The in-memory loader: batches are index slices of a uint8 tensor already on the training device, and
augmentation runs per batch on that device with per-sample randomness -- no per-image Python, no
worker processes (airbench's approach, applied to every dataset)."""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.nn import functional as F

from .base import ImageDataset, normalization_stats

__all__ = ["Augment", "Loader", "random_erasing", "resize", "crop_flip_gather", "random_resized_crop", "center_crop",
           "jpeg_reencode", "RRC_STORAGE_RATIO"]


@dataclass(frozen=True)
class Augment:
    """Training augmentation, applied per batch.

    Attributes:
        crop_padding: pad by this many pixels, then crop back at a random offset (0: off).
        padding_mode: "reflect" or "zeros".
        flip: horizontal flip, of a random half of the batch.
        alternate_flip: flip each image in every other epoch instead (a random half in even epochs, the
            other half in odd ones): Jordan, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU" (2024),
            sec. 3.6 -- every pair of epochs sees each image both ways, which helps short runs.
        erasing: probability of random erasing (a rectangle set to the mean), 0: off.
        rrc: random-resized-crop (the ImageNet recipes' augmentation): a random box of ``rrc_scale`` of
            the area and an aspect ratio in [3/4, 4/3], resized to the training size.
        jpeg_quality: re-encode a random half of each batch as JPEG at a random quality between this and 95
            (0: off): the artefacts of a JPEG dataset, varied.
    """

    crop_padding: int = 4
    padding_mode: str = "reflect"
    flip: bool = True
    erasing: float = 0.0
    alternate_flip: bool = False
    rrc: bool = False
    rrc_scale: Tuple[float, float] = (0.35, 1.0)
    jpeg_quality: int = 0

    @classmethod
    def parse(cls, spec: Union[str, "Augment", bool, None]) -> "Augment":
        """"none", "crop", "flip", "crop+flip", "crop+flip+erase", "rrc+flip", with "altflip" for the
        alternating flip in place of "flip", "cropN" for a crop padded by N pixels instead of 4 (e.g.
        "crop2+flip") and "jpeg" (or "jpegN", N the lowest quality, default 50) for JPEG re-encoding; or an
        Augment, or True/False)."""
        if isinstance(spec, Augment):
            return spec
        if spec is None or spec is True:
            return cls()
        if spec is False or spec == "none" or spec == "":
            return cls(crop_padding=0, flip=False, erasing=0.0)
        parts = set(str(spec).replace(",", "+").split("+"))
        crops = {p for p in parts if re.fullmatch(r"crop\d*", p)}
        jpeg = {p for p in parts if re.fullmatch(r"jpeg\d*", p)}
        unknown = parts - crops - jpeg - {"flip", "altflip", "erase", "rrc"}
        if unknown:
            raise ValueError(f"unknown augmentation {', '.join(sorted(unknown))}; use crop (or cropN, N pixels of "
                             f"padding) or rrc, flip (or altflip), erase, jpeg (or jpegN, N the lowest quality) "
                             f"joined by +")
        quality = 0
        if jpeg:
            quality = int(jpeg.pop()[4:] or 50) if len(jpeg) == 1 else -1
            if not 1 <= quality <= 95:
                raise ValueError("augmentation: one jpegN, N the lowest quality from 1 to 95")
        if len(crops) > 1 or (crops and "rrc" in parts):
            raise ValueError(f"augmentation: {' and '.join(sorted(crops | (parts & {'rrc'})))} exclude each other; "
                             f"use one crop")
        padding = int(crops.pop()[4:] or 4) if crops else 0
        if {"flip", "altflip"} <= parts:
            raise ValueError("augmentation: flip and altflip exclude each other; use one")
        return cls(crop_padding=padding, flip=bool(parts & {"flip", "altflip"}),
                   erasing=0.25 if "erase" in parts else 0.0, alternate_flip="altflip" in parts, rrc="rrc" in parts,
                   jpeg_quality=quality)

    @property
    def enabled(self) -> bool:
        return bool(self.crop_padding or self.flip or self.erasing or self.rrc or self.jpeg_quality)


# torchvision's ImageNet convention: images stored at 256 for a 224 crop.
RRC_STORAGE_RATIO = 256 / 224


def random_resized_crop(x: torch.Tensor, size: Sequence[int], generator: Optional[torch.Generator],
                        scale: Tuple[float, float] = (0.35, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """A random box per image (``scale`` of the area, aspect ratio in ``ratio`` on a log scale, clipped to
    the image) resized to ``size`` (H, W) by bilinear sampling: one batched ``grid_sample`` on the device."""
    n, _, h, w = x.shape
    dev = x.device
    area = torch.empty(n, device=dev).uniform_(*scale, generator=generator) * h * w
    aspect = torch.empty(n, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp()
    box_w = (area * aspect).sqrt().clamp(1, w)
    box_h = (area / aspect).sqrt().clamp(1, h)
    centre_x = torch.rand(n, device=dev, generator=generator) * (w - box_w) + box_w / 2
    centre_y = torch.rand(n, device=dev, generator=generator) * (h - box_h) + box_h / 2
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = box_w / w, 2 * centre_x / w - 1
    theta[:, 1, 1], theta[:, 1, 2] = box_h / h, 2 * centre_y / h - 1
    grid = F.affine_grid(theta, (n, x.shape[1], *size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def center_crop(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The centre ``size`` (H, W) of each image (torchvision's evaluation crop)."""
    h, w = x.shape[-2:]
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return x[..., top:top + size[0], left:left + size[1]]


def random_erasing(x: torch.Tensor, generator: torch.Generator, p: float = 0.25,
                   scale: Tuple[float, float] = (0.02, 0.33), ratio: Tuple[float, float] = (0.3, 3.3),
                   value: float = 0.0) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020): with probability ``p`` a rectangle of random area and aspect
    ratio is set to ``value`` (0 after normalisation: the mean)."""
    n, _, h, w = x.shape
    dev = x.device
    area = torch.empty(n, device=dev).uniform_(*scale, generator=generator) * h * w
    log_r = torch.empty(n, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_r.exp()
    eh = (area * aspect).sqrt().round().clamp(1, h).long()
    ew = (area / aspect).sqrt().round().clamp(1, w).long()
    top = (torch.rand(n, device=dev, generator=generator) * (h - eh + 1)).long()
    left = (torch.rand(n, device=dev, generator=generator) * (w - ew + 1)).long()
    apply = torch.rand(n, device=dev, generator=generator) < p
    ys = torch.arange(h, device=dev)[None, :]
    xs = torch.arange(w, device=dev)[None, :]
    in_rows = (ys >= top[:, None]) & (ys < (top + eh)[:, None])
    in_cols = (xs >= left[:, None]) & (xs < (left + ew)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None])[:, None]
    return x.masked_fill(mask, value)


def jpeg_reencode(images: torch.Tensor, generator: Optional[torch.Generator], lowest: int,
                  p: float = 0.5) -> torch.Tensor:
    """JPEG-encode and decode (Pillow, in memory) a random ``p`` of a uint8 batch (N x C x H x W), each image
    at a random quality in [``lowest``, 95]."""
    from PIL import Image
    n = images.shape[0]
    chosen = torch.rand(n, device=images.device, generator=generator) < p
    quality = torch.randint(lowest, 96, (n,), device=images.device, generator=generator)
    out = images.cpu().clone()
    pixels = out.permute(0, 2, 3, 1).numpy()  # a view: decoded bytes are written back in place
    for i, q in zip(chosen.nonzero().flatten().tolist(), quality[chosen].tolist()):
        buffer = io.BytesIO()
        Image.fromarray(pixels[i].squeeze(-1) if pixels.shape[-1] == 1 else pixels[i]).save(buffer, "JPEG",
                                                                                            quality=q)
        pixels[i] = np.asarray(Image.open(buffer)).reshape(pixels[i].shape)
    return out.to(images.device)


def _reflect(pos: torch.Tensor, size: int) -> torch.Tensor:
    # Index of a reflect-padded position (no edge repeat, as F.pad's "reflect"), valid for |pad| < size.
    pos = pos.abs()
    return torch.where(pos >= size, 2 * (size - 1) - pos, pos)


def crop_flip_gather(images: torch.Tensor, index: torch.Tensor, generator: torch.Generator, padding: int,
                     flip: bool, mode: str = "reflect", mirrored: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Random crop (with padding) and horizontal flip of ``images[index]`` in one gather on uint8 data.

    The padded image is never built: each output pixel's source row and column are computed from the
    sample's random offset (reflected at the borders, or masked to 0 for zero padding) and flip, so a
    batch costs one indexed read of N x C x H x W bytes. ``mirrored`` (bool, one per sample) chooses
    which samples are flipped instead of a random half.
    """
    n = index.shape[0]
    _, c, h, w = images.shape
    dev = images.device
    rows = torch.arange(h, device=dev).expand(n, h)
    cols = torch.arange(w, device=dev).expand(n, w)
    if padding:
        dy = torch.randint(0, 2 * padding + 1, (n, 1), device=dev, generator=generator) - padding
        dx = torch.randint(0, 2 * padding + 1, (n, 1), device=dev, generator=generator) - padding
        rows, cols = rows + dy, cols + dx
    if mirrored is not None:
        cols = torch.where(mirrored.view(n, 1).to(dev), cols.flip(1), cols)
    elif flip:
        mirrored = torch.rand(n, 1, device=dev, generator=generator) < 0.5
        cols = torch.where(mirrored, cols.flip(1), cols)
    inside = None
    if padding and (mode != "reflect" or padding >= min(h, w)):
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        rows, cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    elif padding:
        rows, cols = _reflect(rows, h), _reflect(cols, w)
    flat = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    out = torch.gather(images[index].view(n, c, h * w), 2, flat).view(n, c, h, w)
    if inside is not None:
        out = out * inside[:, None].to(out.dtype)
    return out


def resize(x: torch.Tensor, size: Optional[Sequence[int]]) -> torch.Tensor:
    """Bilinear resize of a float batch to ``size`` (H, W); a no-op when it already has that size."""
    if size is None or tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False,
                         antialias=bool(size[0] < x.shape[-2]))


class Loader:
    """Iterate over an :class:`ImageDataset` in batches of float32 normalised images and int64 labels.

    Args:
        dataset: the split, whole in memory.
        batch_size: images per batch (per process under torchrun: pass the global batch divided by
            ``world_size``).
        train: shuffle each epoch (seeded), augment, and drop the last partial batch by default.
        augment: an :class:`Augment`, a spec such as "crop+flip", or None for crop+flip in training.
        image_size: resize batches to this side (int) or (H, W); the d2l recipes use 96 and 224.
        device: where the images live and batches are made.
        seed: fixes the order and the augmentation of every epoch (epoch ``e`` uses ``seed`` and ``e``).
        drop_last: default ``train``.
        rank, world_size: this process's disjoint, equal-length shard of each epoch's permutation.
        mean, std: normalisation constants (per channel); default: computed from ``dataset``. Pass the
            training split's constants to the test loader.
        channels_last: yield channels-last tensors.
        eval_crop: outside training, cut the centre ``image_size`` out of larger stored images instead of
            resizing them (the evaluation of random-resized-crop training, stored at 256 for 224).
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, train: bool = True, augment=None,
                 image_size=None, device: Union[str, torch.device] = "cpu", seed: int = 0,
                 drop_last: Optional[bool] = None, rank: int = 0, world_size: int = 1,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                 channels_last: bool = False, eval_crop: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.train = train
        self.augment = Augment.parse(augment) if train else Augment.parse(False)
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.image_size = tuple(image_size) if image_size else None
        self.device = torch.device(device)
        self.seed = int(seed)
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world_size = rank, world_size
        if mean is None or std is None:
            mean, std = normalization_stats(dataset.images)
        self.mean_values, self.std_values = list(mean), list(std)
        channels = dataset.images.shape[1]
        if len(self.mean_values) != channels or len(self.std_values) != channels:
            raise ValueError(f"mean/std have {len(self.mean_values)} values for {channels}-channel images")
        self.mean = torch.tensor(self.mean_values, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(self.std_values, device=self.device).view(1, -1, 1, 1)
        self.channels_last = channels_last
        self.eval_crop = eval_crop
        # A memory-mapped split stays on disk: each batch is gathered from the map (then moved to the device).
        self.on_disk = dataset.storage == "disk"
        image_bytes = max(1, math.prod(dataset.images.shape[1:]))
        self._release_every = max(1, (32 << 20) // (image_bytes * self.batch_size))  # about every 32 MB read
        self.images = dataset.images if self.on_disk else dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        self.epoch = 0
        if self.augment.alternate_flip:  # which images epoch 0 flips, fixed by the seed (every rank agrees)
            first = torch.Generator().manual_seed(self._seed_for(0, 2))
            self.flipped_first = (torch.rand(len(dataset), generator=first) < 0.5).to(self.device)
        if self.num_samples == 0:
            raise ValueError(f"{dataset.name} {dataset.split}: no samples for rank {rank} of {world_size}")
        if len(self) == 0:
            raise ValueError(f"{dataset.name} {dataset.split}: {self.num_samples} samples are fewer than one "
                             f"batch of {self.batch_size} with drop_last; lower the batch size")

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch (equal on every rank; the remainder is dropped in training)."""
        n = len(self.dataset)
        if self.world_size == 1:
            return n
        return n // self.world_size if self.train else len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _seed_for(self, epoch: int, stream: int) -> int:
        return (self.seed * 1_000_003 + epoch * 7919 + stream) % (2 ** 63)

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample order for ``epoch`` (on the CPU): a seeded permutation in training,
        sliced into ``world_size`` disjoint shards of equal length."""
        n = len(self.dataset)
        if not self.train:
            return torch.arange(self.rank, n, self.world_size)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self._seed_for(epoch, 0)))
        usable = (n // self.world_size) * self.world_size
        return perm[self.rank:usable:self.world_size]

    def batch(self, index: torch.Tensor, generator: Optional[torch.Generator] = None,
              epoch: Optional[int] = None) -> torch.Tensor:
        """The images at ``index`` as a training/test batch of ``epoch`` (default: the current one);
        crop and flip are fused with the gather."""
        aug = self.augment
        images, source = self.images, index
        if self.on_disk and self.device.type != "cpu":
            images = self.images[index.cpu()].to(self.device, non_blocking=True)
            source = torch.arange(len(index), device=self.device)
        if self.train and (aug.crop_padding or aug.flip):
            mirrored = None
            if aug.alternate_flip:
                parity = (self.epoch if epoch is None else epoch) % 2
                mirrored = self.flipped_first[index.to(self.device)] ^ bool(parity)
            images = crop_flip_gather(images, source, generator, aug.crop_padding, aug.flip, aug.padding_mode,
                                      mirrored)
        else:
            images = images[source]
        return self._finish(images, generator)

    def _finish(self, images: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
        aug = self.augment
        if self.train and aug.jpeg_quality:
            images = jpeg_reencode(images, generator, aug.jpeg_quality)
        x = images.float()
        size = self.image_size or tuple(x.shape[-2:])
        if self.train and aug.rrc:
            x = random_resized_crop(x.div_(255), size, generator, aug.rrc_scale).sub_(self.mean).div_(self.std)
        elif self.eval_crop and not self.train and tuple(x.shape[-2:]) != size:
            x = center_crop(x, size).sub_(self.mean * 255).div_(self.std * 255)
        elif tuple(x.shape[-2:]) != size:
            x = resize(x.div_(255), size).sub_(self.mean).div_(self.std)
        else:  # one fused affine map from bytes to normalised values
            x = x.sub_(self.mean * 255).div_(self.std * 255)
        if self.train and aug.erasing:
            x = random_erasing(x, generator, aug.erasing)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1
        return self.iterate(epoch)

    def iterate(self, epoch: int, start_batch: int = 0,
                generator_state: Optional[torch.Tensor] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Batches of ``epoch`` from ``start_batch`` on. To resume mid-epoch exactly, pass the
        augmentation generator state saved from :attr:`generator` after the last finished batch."""
        order = self.indices(epoch).to(self.device)
        device = self.device if self.device.type in ("cpu", "cuda") else torch.device("cpu")
        self.generator = torch.Generator(device=device).manual_seed(self._seed_for(epoch, 1))
        if generator_state is not None:
            self.generator.set_state(generator_state)
        for b in range(start_batch, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.batch(idx, self.generator, epoch), self.labels[idx]
            if self.on_disk and (b + 1) % self._release_every == 0:
                self.dataset.release_pages()
