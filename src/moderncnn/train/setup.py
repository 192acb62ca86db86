"""From a resolved config to everything a run trains with: device, data, model, optimizer, plan, loaders."""
from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import nn

from ..data import Augment, ImageDataset, Loader, has_validation_folder, load_dataset
from ..data.loader import RRC_STORAGE_RATIO
from ..data.datasets import normalization_stats
from ..models import create_model
from ..models.pretrained import freeze_backbone
from ..report.summary import count_parameters, summary
from ..runs import ModelSpec, RunInfo, TrainConfig, run_name, software_versions
from .budget import TrainingPlan
from .config import RECIPES, rrc_scale
from .distributed import DistInfo, broadcast_object, setup_distributed
from .init import whiten_first_conv, xavier_init
from .malloc import MMAP_THRESHOLD, pin_mmap_threshold
from .optim import build_optimizer, ema_warmup_fn

__all__ = ["TrainSetup", "build_setup", "pick_device", "autocast_dtype", "cpu_has_native_bf16", "precision_name"]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX). Elsewhere oneDNN emulates it,
    slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu, since torch 2.3
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_dtype(amp: Union[bool, str], device: torch.device, source: str = "--amp") -> Optional[torch.dtype]:
    """The autocast dtype of a run: bfloat16 or None (fp32).

    ``amp`` True asks for bfloat16 (an error where the device has no native bfloat16), "auto" takes it
    where the device has it (CUDA; CPUs with AVX512-BF16 or AMX) and runs fp32 elsewhere, False is fp32."""
    if not amp:
        return None
    native = (torch.cuda.is_bf16_supported() if device.type == "cuda"
              else device.type == "cpu" and cpu_has_native_bf16())
    if native:
        return torch.bfloat16
    if amp == "auto":
        return None
    raise ValueError(f"{source} needs bfloat16 in hardware: a CUDA device, or a CPU with AVX512-BF16 or AMX "
                     f"(this {device.type} has neither, so fp32 is its fast path; pass --no-amp or --amp auto)")


def precision_name(amp_dtype: Optional[torch.dtype]) -> str:
    return "float32" if amp_dtype is None else "bfloat16 autocast"


def pick_device(name: str) -> torch.device:
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if name == "mps" and not mps:
        raise ValueError("--device mps: MPS is not available here")
    return torch.device(name)


@dataclass
class TrainSetup:
    """Everything a run trains with. ``model`` is the network itself (its contract: ``loss``, ``head_names``);
    ``net`` is what the steps call (DDP-wrapped and/or compiled); ``eval_model`` what is scored."""

    cfg: TrainConfig
    device: torch.device
    dist: DistInfo
    amp_dtype: Optional[torch.dtype]
    train_set: ImageDataset
    val_set: Optional[ImageDataset]
    test_set: ImageDataset
    info: RunInfo
    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: Optional[nn.Module]
    criterion: nn.Module
    plan: TrainingPlan
    train_loader: Loader
    val_loader: Optional[Loader]
    test_loader: Loader
    run_dir: Path = field(default_factory=Path)
    allocator: str = ""  # what was changed in the process's allocator, for the start line

    @property
    def spec(self) -> ModelSpec:
        return self.info.spec

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def resume_command(self) -> str:
        return f"moderncnn train --resume {shlex.quote(str(self.run_dir))} --epochs {self.cfg.epochs}"


def _stored_size(cfg: TrainConfig) -> Optional[int]:
    """The side an image folder is decoded at: the training size, or larger for random-resized-crop, which
    crops from images stored at 256 for 224 (torchvision's ratio) and evaluates on their centre."""
    if cfg.image_size and Augment.parse(cfg.augment).rrc:
        return int(round(cfg.image_size * RRC_STORAGE_RATIO))
    return cfg.image_size


def _load_splits(cfg: TrainConfig, info: DistInfo) -> Tuple[ImageDataset, Optional[ImageDataset], ImageDataset, str]:
    """(train, validation or None, test, where the validation set came from)."""
    if cfg.download and info.enabled:
        # Rank 0 downloads (once); the others wait for it, then read the files it wrote.
        if info.is_main:
            load_dataset(cfg.dataset, root=cfg.data_dir, split="train", download=True)
        torch.distributed.barrier()
    kwargs = dict(root=cfg.data_dir, download=cfg.download and info.is_main)
    folder = cfg.dataset == "imagefolder"
    if folder:
        kwargs.update(image_size=_stored_size(cfg), val_fraction=cfg.val_fraction, seed=cfg.seed, resize=cfg.resize,
                      cache=cfg.data_cache, cache_root=cfg.cache_dir, workers=cfg.decode_workers,
                      strict=cfg.strict_data)
    if folder and info.enabled and not info.is_main:
        torch.distributed.barrier()  # rank 0 decodes the folder into the cache first; the others then map it
    train_set = load_dataset(cfg.dataset, split="train", **kwargs)
    test_set = load_dataset(cfg.dataset, split="test", **kwargs)
    if folder and has_validation_folder(cfg.data_dir) and cfg.val_fraction is None and not cfg.val_split:
        val_folder = load_dataset(cfg.dataset, split="val", **kwargs)
    else:
        val_folder = None
    if folder and info.enabled and info.is_main:
        torch.distributed.barrier()
    if cfg.subset:
        train_set, test_set = train_set.subset(cfg.subset, seed=cfg.seed), test_set.subset(cfg.subset, seed=cfg.seed)
    val_set, validation = None, ""
    if cfg.val_split:
        train_set, val_set = train_set.split_validation(cfg.val_split, seed=cfg.seed)
        validation = f"{len(val_set):,} images held out of the training set (--val-split {cfg.val_split:g})"
    elif val_folder is not None:
        val_set = val_folder
        validation = f"the val/ folder ({len(val_set):,} images)"
    return train_set, val_set, test_set, validation


def _build_model(cfg: TrainConfig, train_set: ImageDataset, image_size: int) -> Tuple[nn.Module, dict, str, float]:
    """(model, its constructor arguments, what fine-tuning trains, the head's learning-rate factor)."""
    channels = train_set.images.shape[1]
    model_kwargs = dict(cfg.model_kwargs)
    model = create_model(cfg.model, num_classes=train_set.num_classes, in_chans=channels,
                         pretrained=cfg.pretrained, **model_kwargs)
    if getattr(model, "transform_input", False):  # set by GoogLeNet's ImageNet weights: rebuild it the same way
        model_kwargs["transform_input"] = True
    model.check_input_size(image_size, image_size, source=f"{cfg.dataset} images are",
                           remedy=f"Pass --image-size {model.min_input_size[1]} (or larger) to resize them.")
    if 0 < cfg.progressive_size < image_size:
        model.check_input_size(cfg.progressive_size, cfg.progressive_size, source=f"--progressive-size {cfg.progressive_size} gives",
                               remedy="Start progressive resizing at a larger size.")
    if cfg.init == "xavier" and not cfg.pretrained:
        xavier_init(model)
    frozen, head_lr_mult = "", cfg.head_lr_mult or 1.0
    if cfg.freeze_backbone:
        frozen = freeze_backbone(model)
    elif cfg.pretrained:
        head_lr_mult = cfg.head_lr_mult or 10.0  # new head learns fast, pretrained backbone slowly
        frozen = (f"all parameters; classifier ({', '.join(model.head_names)}) at {head_lr_mult:g}x the "
                  f"learning rate of the pretrained backbone")
    return model, model_kwargs, frozen, head_lr_mult


def _place(model: nn.Module, cfg: TrainConfig, device: torch.device, info: DistInfo) -> Tuple[nn.Module, nn.Module]:
    """Move the model to its device and layout; returns it and what the steps call (DDP, compiled)."""
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if info.enabled and cfg.sync_bn:
        if device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net: nn.Module = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, torch.compile(net) if cfg.compile else net


def _loaders(cfg, sets, image_size, mean, std, device, info) -> Tuple[Loader, Optional[Loader], Loader]:
    train_set, val_set, test_set = sets
    if cfg.batch_size % info.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                         f"{info.world_size} processes")
    per_rank = cfg.batch_size // info.world_size
    augment = Augment.parse(cfg.augment)
    if augment.rrc and cfg.rrc_scale:
        augment = dataclasses.replace(augment, rrc_scale=rrc_scale(cfg.rrc_scale))
    common = dict(image_size=image_size, device=device, rank=info.rank, world_size=info.world_size, mean=mean,
                  std=std, channels_last=cfg.channels_last, eval_crop=augment.rrc)
    train = Loader(train_set, per_rank, train=True, augment=augment, seed=cfg.seed, **common)
    val = Loader(val_set, max(per_rank, 256), train=False, **common) if val_set is not None else None
    return train, val, Loader(test_set, max(per_rank, 256), train=False, **common)


def _first_conv_bias_steps(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int) -> dict:
    """{the first convolution's bias: the steps it trains} under --first-conv-bias-epochs, else {}."""
    if not cfg.first_conv_bias_epochs:
        return {}
    bias = model.get_submodule(model.first_conv).bias
    if bias is None or not bias.requires_grad:
        raise ValueError(f"--first-conv-bias-epochs: {cfg.model}'s first convolution ({model.first_conv}) has no "
                         f"trainable bias")
    return {bias: max(1, int(round(cfg.first_conv_bias_epochs * steps_per_epoch)))}


def _tune_allocator(cfg: TrainConfig, device: torch.device) -> str:
    """A memory-efficient run on the CPU pins glibc's mmap threshold (see malloc.py): without it, glibc keeps
    freed activation buffers and the memory the mode saves stays in the process."""
    if device.type != "cpu" or not cfg.model_kwargs.get("memory_efficient"):
        return ""
    return f"glibc mmap threshold pinned at {MMAP_THRESHOLD // 1024} KiB" if pin_mmap_threshold() else ""


def _new_run_dir(cfg: TrainConfig, info: DistInfo) -> Path:
    run_dir = Path(broadcast_object(str(Path(cfg.out) / (cfg.name or run_name(cfg.model, cfg.dataset))), info))
    if info.is_main:
        if (run_dir / "last.pt").exists():
            raise ValueError(f"{run_dir} already holds a run; use --resume {run_dir} or another --name")
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def build_setup(cfg: TrainConfig, resuming: bool = False) -> TrainSetup:
    """Turn a resolved config into a :class:`TrainSetup` (a resumed run then loads its state into it)."""
    device = pick_device(cfg.device)
    dist = setup_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    torch.manual_seed(cfg.seed)
    amp_dtype = autocast_dtype(cfg.amp, device, source=f"recipe {cfg.recipe!r} uses --amp, which"
                               if RECIPES.get(cfg.recipe, {}).get("amp") is True else "--amp")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest kernels once
    if cfg.pretrained is True and not cfg.image_size:
        from ..models.pretrained import has_pretrained, preprocessing
        if has_pretrained(cfg.model):  # the resolution the ImageNet weights were trained at
            cfg = dataclasses.replace(cfg, image_size=preprocessing(cfg.model)["crop"])
    train_set, val_set, test_set, validation = _load_splits(cfg, dist)
    image_size = cfg.image_size or train_set.images.shape[-1]
    channels = train_set.images.shape[1]
    # The statistics read the whole split; a memory-mapped one's pages are released as they go.
    mean, std = (normalization_stats(train_set.images, after_chunk=train_set.release_pages) if cfg.normalize
                 else ([0.0] * channels, [1.0] * channels))
    model, model_kwargs, frozen, head_lr_mult = _build_model(cfg, train_set, image_size)
    if cfg.init == "whiten" and not cfg.pretrained and not resuming:
        whiten_first_conv(model, train_set.images, mean, std, image_size=image_size)
    if getattr(model, "pretrained_cfg", None) and cfg.normalize:
        mean, std = list(model.pretrained_cfg["mean"]), list(model.pretrained_cfg["std"])
    spec = ModelSpec(cfg.model, train_set.num_classes, channels, image_size, list(train_set.classes), mean, std,
                     model_kwargs, list(train_set.images.shape[-2:]), cfg.dataset, cfg.resize,
                     eval_crop=Augment.parse(cfg.augment).rrc and train_set.images.shape[-1] > image_size)
    splits = [s for s in (train_set, val_set, test_set) if s is not None]
    info = RunInfo(cfg, spec, count_parameters(model), count_parameters(model, trainable_only=True),
                   summary(model, (1, channels, image_size, image_size)).total_flops, len(train_set),
                   len(val_set) if val_set is not None else 0, len(test_set), validation, train_set.storage,
                   sum(len(s.skipped) for s in splits), frozen, precision_name(amp_dtype), dist.world_size,
                   software_versions(device))
    model, net = _place(model, cfg, device, dist)
    train_loader, val_loader, test_loader = _loaders(cfg, (train_set, val_set, test_set), image_size, mean, std,
                                                     device, dist)
    plan = TrainingPlan(cfg, len(train_loader), image_size, len(train_set), len(test_set) + info.val_images,
                        agree=lambda steps: int(broadcast_object(int(steps), dist)))
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum,
                                head_lr_mult=head_lr_mult, head_names=model.head_names if frozen else (),
                                muon_lr=cfg.muon_lr, bias_lr=cfg.bias_lr, muon_momentum=cfg.muon_momentum,
                                muon_normalize=bool(cfg.muon_normalize),
                                train_steps=_first_conv_bias_steps(model, cfg, len(train_loader)))
    ema = None
    if cfg.ema:
        from torch.optim.swa_utils import AveragedModel
        ema = AveragedModel(model, multi_avg_fn=ema_warmup_fn(cfg.ema), use_buffers=True)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    run_dir = Path(cfg.resume) if resuming else _new_run_dir(cfg, dist)
    return TrainSetup(cfg, device, dist, amp_dtype, train_set, val_set, test_set, info, model, net, optimizer,
                      plan.scheduler(optimizer), ema, criterion, plan, train_loader, val_loader, test_loader, run_dir,
                      _tune_allocator(cfg, device))
