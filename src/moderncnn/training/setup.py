"""From a resolved config to everything a run trains with: device, data, model, optimizer, plan, loaders."""
from __future__ import annotations

import inspect
import shlex
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from ..data import Augment, ImageDataset, Loader, has_validation_folder, load_dataset
from ..data.loader import RRC_STORAGE_RATIO
from ..data.datasets import normalization_stats
from ..models import create_model
from ..models.pretrained import freeze_backbone
from ..report.summary import count_parameters, summary
from ..runlock import LOCK_NAME, RunLock, lock_run_dir
from ..runs import ModelSpec, ModerncnnWarning, RunInfo, TrainConfig, UsageError, run_name, software_versions
from .budget import TrainingPlan
from .distributed import DistInfo, broadcast_object, setup_distributed
from .init import whiten_first_conv, xavier_init
from .malloc import MMAP_THRESHOLD, pin_mmap_threshold
from .optim import build_optimizer, ema_warmup_fn
from .precision import Precision, ScaledBackward, apply_fp32_precision, make_grad_scaler
from .resolve import ResolvedConfig, pick_device

__all__ = ["TrainSetup", "build_setup", "pick_device"]


@dataclass
class TrainSetup:
    """Everything a run trains with. ``model`` is the network itself (its contract: ``loss``, ``head_names``);
    ``net`` is what the steps call (DDP-wrapped and/or compiled); ``eval_model`` what is scored."""

    cfg: TrainConfig  # complete: what config.json records (``resolved.config``)
    device: torch.device
    dist: DistInfo
    precision: Precision
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
    backward: ScaledBackward = field(default_factory=ScaledBackward)  # the step's backward, scaled under fp16
    lock: Optional[RunLock] = None  # the run directory's writer lock (rank 0 of a new run)
    saved: str = ""  # where last.pt stands ("epoch 2, step 40"), for the line of a second Ctrl-C

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype (None: float32)."""
        return self.precision.dtype

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


def _stored_size(cfg: TrainConfig, augment: Augment) -> Optional[int]:
    """The side an image folder is decoded at: the training size, or larger for random-resized-crop, which
    crops from images stored at 256 for 224 (torchvision's ratio) and evaluates on their centre."""
    if cfg.image_size and augment.rrc:
        return int(round(cfg.image_size * RRC_STORAGE_RATIO))
    return cfg.image_size


def _load_splits(cfg: TrainConfig, augment: Augment, info: DistInfo) -> Tuple[ImageDataset, Optional[ImageDataset],
                                                                              ImageDataset, str, dict]:
    """(train, validation or None, test, where the validation set came from, the training data's
    fingerprint)."""
    if cfg.download and info.enabled:
        # Rank 0 downloads (once); the others wait for it, then read the files it wrote.
        if info.is_main:
            load_dataset(cfg.dataset, root=cfg.data_dir, split="train", download=True)
        torch.distributed.barrier()
    kwargs = dict(root=cfg.data_dir, download=cfg.download and info.is_main)
    folder = cfg.dataset == "imagefolder"
    if folder:
        kwargs.update(image_size=_stored_size(cfg, augment), val_fraction=cfg.val_fraction, seed=cfg.seed, resize=cfg.resize,
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
    fingerprint = {"train": train_set.fingerprint()}
    if val_folder is not None:
        fingerprint["val"] = val_folder.fingerprint()
    if cfg.subset:
        train_set, test_set = train_set.subset(cfg.subset, seed=cfg.seed), test_set.subset(cfg.subset, seed=cfg.seed)
    val_set, validation = None, ""
    if cfg.val_split:
        train_set, val_set = train_set.split_validation(cfg.val_split, seed=cfg.seed)
        validation = f"{len(val_set):,} images held out of the training set (--val-split {cfg.val_split:g})"
    elif val_folder is not None:
        val_set = val_folder
        validation = f"the val/ folder ({len(val_set):,} images)"
    return train_set, val_set, test_set, validation, fingerprint


def _check_fingerprint(cfg: TrainConfig, saved: Optional[dict], now: dict) -> None:
    """A resumed run trains on the data it started with, or is refused naming what changed."""
    if saved is None:
        warnings.warn(f"{cfg.resume}: this run was saved before moderncnn recorded a fingerprint of its data, so "
                      f"whether its training data changed cannot be checked", ModerncnnWarning, stacklevel=3)
        return
    changes = []
    for split in sorted(set(saved) | set(now)):
        old, new = saved.get(split) or {}, now.get(split) or {}
        if old.get("images") != new.get("images"):
            changes.append(f"{new.get('source') or old.get('source')}: {old.get('images')} -> "
                           f"{new.get('images')} images")
        elif {k: v for k, v in old.items() if k != "source"} != {k: v for k, v in new.items() if k != "source"}:
            changes.append(f"{new.get('source') or old.get('source')}: the same {new.get('images'):,} images, but "
                           f"files or contents changed")
    if changes:
        raise UsageError(f"--resume {cfg.resume}: the training data changed since the run started "
                         f"({'; '.join(changes)}); start a new run on it")


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
            raise UsageError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net: nn.Module = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, torch.compile(net) if cfg.compile else net


def _loaders(cfg, augment, sets, image_size, mean, std, device, info) -> Tuple[Loader, Optional[Loader], Loader]:
    train_set, val_set, test_set = sets
    if cfg.batch_size % info.world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                         f"{info.world_size} processes")
    per_rank = cfg.batch_size // info.world_size
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
        raise UsageError(f"--first-conv-bias-epochs: {cfg.model}'s first convolution ({model.first_conv}) has no "
                         f"trainable bias")
    return {bias: max(1, int(round(cfg.first_conv_bias_epochs * steps_per_epoch)))}


def _tune_allocator(cfg: TrainConfig, device: torch.device) -> str:
    """A memory-efficient run on the CPU pins glibc's mmap threshold (see malloc.py): without it, glibc keeps
    freed activation buffers and the memory the mode saves stays in the process."""
    if device.type != "cpu" or not cfg.model_kwargs.get("memory_efficient"):
        return ""
    return f"glibc mmap threshold pinned at {MMAP_THRESHOLD // 1024} KiB" if pin_mmap_threshold() else ""


def _new_run_dir(cfg: TrainConfig, info: DistInfo) -> Tuple[Path, Optional[RunLock]]:
    """The new run's directory and its writer lock (rank 0 holds it), taken before anything is written."""
    run_dir = Path(broadcast_object(str(Path(cfg.out) / (cfg.name or run_name(cfg.model, cfg.dataset))), info))
    if not info.is_main:
        return run_dir, None
    existed = run_dir.exists()
    lock = lock_run_dir(run_dir)
    if (run_dir / "last.pt").exists():
        lock.release()
        raise UsageError(f"{run_dir} already holds a run; use --resume {run_dir} or another --name")
    lock.created = not existed
    return run_dir, lock


def _check_model_arguments(cfg: TrainConfig) -> None:
    """Unknown ``--model-arg`` keys fail before any data loads, naming the valid ones."""
    if not cfg.model_kwargs:
        return
    with torch.device("meta"):  # shapes only: nothing allocated or initialised
        try:
            create_model(cfg.model, **cfg.model_kwargs)
        except TypeError as exc:
            if "argument" not in str(exc):
                raise
            valid = sorted(set(inspect.signature(type(create_model(cfg.model)).__init__).parameters)
                           - {"self", "args", "kwargs", "num_classes", "in_chans"})
            raise UsageError(f"--model-arg: {cfg.model} does not take "
                             f"{', '.join(sorted(cfg.model_kwargs))} as given ({exc}); its arguments are "
                             f"{', '.join(valid)}") from None


def build_setup(resolved: ResolvedConfig) -> TrainSetup:
    """Build what ``resolved`` describes: a new run's directory is created and locked first; a resumed run
    (``resolved.resume``, locked by the trainer) must match the training data it was saved with, and then loads
    its state into the setup. Nothing is decided here that :func:`~moderncnn.training.resolve.resolve_config`
    decides."""
    cfg = resolved.config
    _check_model_arguments(cfg)
    dist = setup_distributed(resolved.device.type)
    torch.manual_seed(cfg.seed)
    apply_fp32_precision(cfg.fp32_precision)
    if resolved.resume is not None:
        run_dir, lock = resolved.resume.run_dir, None  # the trainer holds the resumed run's lock
    else:
        run_dir, lock = _new_run_dir(cfg, dist)
    try:
        return _build(resolved, dist, run_dir, lock)
    except BaseException:
        if lock is not None:
            lock.release()
            if getattr(lock, "created", False) and {p.name for p in run_dir.iterdir()} <= {LOCK_NAME}:
                shutil.rmtree(run_dir, ignore_errors=True)  # a run that failed to start leaves nothing
        raise


def _build(resolved: ResolvedConfig, dist: DistInfo, run_dir: Path, lock: Optional[RunLock]) -> TrainSetup:
    cfg, device, precision, augment = resolved.config, resolved.device, resolved.precision, resolved.augmentation
    resuming = resolved.resume is not None
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest kernels once
    train_set, val_set, test_set, validation, fingerprint = _load_splits(cfg, augment, dist)
    if resuming and dist.is_main:
        _check_fingerprint(cfg, resolved.checkpoint.get("data_fingerprint"), fingerprint)
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
    spec = ModelSpec(model_name=cfg.model, num_classes=train_set.num_classes, in_chans=channels,
                     image_size=image_size, classes=list(train_set.classes), mean=mean, std=std,
                     model_kwargs=model_kwargs, native_size=list(train_set.images.shape[-2:]), dataset=cfg.dataset,
                     resize=cfg.resize, eval_crop=augment.rrc and train_set.images.shape[-1] > image_size)
    splits = [s for s in (train_set, val_set, test_set) if s is not None]
    info = RunInfo(config=cfg, spec=spec, params=count_parameters(model),
                   trainable_params=count_parameters(model, trainable_only=True),
                   flops_per_image=summary(model, (1, channels, image_size, image_size)).total_flops,
                   train_images=len(train_set), val_images=len(val_set) if val_set is not None else 0,
                   test_images=len(test_set), validation=validation, data_storage=train_set.storage,
                   skipped_files=sum(len(s.skipped) for s in splits), frozen=frozen,
                   precision=precision.description, world_size=dist.world_size, versions=software_versions(device),
                   data_fingerprint=fingerprint)
    model, net = _place(model, cfg, device, dist)
    train_loader, val_loader, test_loader = _loaders(cfg, augment, (train_set, val_set, test_set), image_size, mean,
                                                     std, device, dist)
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
    allocator = _tune_allocator(cfg, device)
    # the plan last: the setup hands over to the budget once (see benchmarks/config_trace.py)
    plan = TrainingPlan(cfg, len(train_loader), image_size, len(train_set), len(test_set) + info.val_images,
                        agree=lambda steps: int(broadcast_object(int(steps), dist)))
    return TrainSetup(cfg=cfg, device=device, dist=dist, precision=precision, train_set=train_set, val_set=val_set,
                      test_set=test_set, info=info, model=model, net=net, optimizer=optimizer,
                      scheduler=plan.scheduler(optimizer), ema=ema, criterion=criterion, plan=plan,
                      train_loader=train_loader, val_loader=val_loader, test_loader=test_loader, run_dir=run_dir,
                      allocator=allocator, backward=ScaledBackward(make_grad_scaler(precision, device)), lock=lock)
