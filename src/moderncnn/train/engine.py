"""The training loop: one path for CPU, one GPU and torchrun/DDP.

Everything a run does is visible here, top to bottom: resolve the config, load data into memory, build
the model, then per epoch train (progress bar, NaN guard, Ctrl-C guard), evaluate, write metrics and
checkpoints; at the end write predictions, plots and report.md into the run directory.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import platform
import signal
import shlex
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import __version__
from ..data import Loader, load_dataset
from ..data.datasets import normalization_stats
from ..models import create_model
from ..models.layers import InputTooSmallError
from ..models.pretrained import keep_frozen_norms_in_eval
from ..report.summary import count_parameters, summary
from .checkpoint import (CheckpointError, load_checkpoint, load_model_state, resolve_checkpoint, save_checkpoint,
                         write_text_atomic)
from .budget import TTA_VIEWS, EpochPlanner
from .config import BUDGET_MAX_EPOCHS, DEFAULTS, RECIPES, TrainConfig, resolve_config, evaluates_after, train_side
from .distributed import DistInfo, all_reduce_sum, broadcast_object, cleanup_distributed, setup_distributed
from .init import whiten_first_conv, xavier_init
from .optim import build_optimizer, build_scheduler, describe_optimizer, ema_warmup_fn

__all__ = ["train", "evaluate", "RunResult", "TrainingInterrupted", "NonFiniteLossError", "pick_device",
           "autocast_dtype", "cpu_has_native_bf16",
           "METRIC_FIELDS", "load_model", "build_model_from_checkpoint"]

# ``tta``: the test-time augmentation level the epoch's test figures used (the last epoch's only, see _train).
# ``train_size``: the side the epoch trained at (below the full size under progressive resizing).
METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "images_per_second",
                 "tta", "train_size", "train_images"]


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM: the run stopped after saving last.pt. ``exit_code`` is 130 or 143."""

    def __init__(self, message: str, exit_code: int, run_dir: Path):
        super().__init__(message)
        self.exit_code = exit_code
        self.run_dir = run_dir


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class RunResult:
    run_dir: Path
    config: TrainConfig
    history: List[Dict[str, float]] = field(default_factory=list)
    best_acc: float = 0.0
    final_acc: float = 0.0
    train_seconds: float = 0.0
    params: int = 0
    flops: int = 0


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX). Elsewhere oneDNN emulates it,
    slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu, since torch 2.3
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def autocast_dtype(amp: Union[bool, str], device: torch.device, source: str = "--amp") -> Optional[torch.dtype]:
    """The autocast dtype of a run: bfloat16 or None (fp32).

    ``amp`` True asks for bfloat16 (an error where the device has no native bfloat16), "auto" takes it
    where the device has it (CUDA; CPUs with AVX512-BF16 or AMX, where a DenseNet-BC trains 1.3-1.8x
    faster than in fp32) and runs fp32 elsewhere, False is fp32."""
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


def _precision(amp_dtype: Optional[torch.dtype]) -> str:
    return "float32" if amp_dtype is None else "bfloat16 autocast"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps: MPS is not available here")
    return torch.device(name)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks after every step."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and _in_main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _loss(outputs, labels: torch.Tensor, criterion) -> Tuple[torch.Tensor, torch.Tensor]:
    """Main logits and the loss; GoogLeNet's auxiliary heads add 0.3x their losses in training."""
    if isinstance(outputs, tuple):
        logits = outputs[0]
        loss = criterion(logits, labels) + 0.3 * sum(criterion(aux, labels) for aux in outputs[1:])
        return logits, loss
    return outputs, criterion(outputs, labels)


def _check_finite(loss: torch.Tensor, where, run_dir: Path) -> None:
    epoch, step, global_step, lr = where
    if not torch.isfinite(loss):
        raise NonFiniteLossError(
            f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1} (global step {global_step + 1}); "
            f"stopped. The learning rate ({lr:.4g}) is probably too high. "
            f"The last good checkpoint is kept in {run_dir}.")


def tta_views(x: torch.Tensor, level: int):
    """(weight, view) pairs of test-time augmentation. Level 1: the image and its mirror. Level 2: those
    two at weight 1/4 each, and both shifted one pixel up-left and one pixel down-right (reflect
    padding) at 1/8 each, views like the random crops of training (the multi-crop TTA of airbench)."""
    if level <= 0:
        return [(1.0, x)]
    if level == 1:
        return [(0.5, x), (0.5, x.flip(3))]
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., :h, :w], padded[..., 2:, 2:]
    return [(0.25, x), (0.25, x.flip(3)), (0.125, up_left), (0.125, up_left.flip(3)),
            (0.125, down_right), (0.125, down_right.flip(3))]


def tta_logits(model: nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
    """Weighted mean of the model's logits over :func:`tta_views`."""
    total = None
    for weight, view in tta_views(x, int(level)):
        out = model(view).float() * weight
        total = out if total is None else total + out
    return total


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, tta: int = 0, amp_dtype=None,
             info: DistInfo = DistInfo(), return_predictions: bool = False):
    """Test loss and accuracy (summed across ranks); ``tta`` is the test-time augmentation level
    (0 off, 1 (or True) flip, 2 flip + one-pixel shifts, see :func:`tta_views`).
    Returns (loss, acc) or (loss, acc, predictions, probabilities)."""
    model.eval()
    device = loader.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    preds, probs = [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = tta_logits(model, x, int(tta))  # float32 whatever the autocast dtype
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        pred = logits.argmax(1)
        correct += (pred == y).sum()
        count += y.numel()
        if return_predictions:
            preds.append(pred.cpu())
            probs.append(logits.softmax(1).cpu())
    for t in (loss_sum, correct, count):
        all_reduce_sum(t, info)
    loss, acc = loss_sum.item() / max(1, count.item()), correct.item() / max(1, count.item())
    if return_predictions:
        return loss, acc, torch.cat(preds), torch.cat(probs)
    return loss, acc


def _versions(device: torch.device) -> Dict[str, str]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "moderncnn": __version__,
            "platform": platform.platform(), "device": str(device), "threads": str(torch.get_num_threads())}
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = platform.processor() or platform.machine()
    return info


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def _write_metrics(path: Path, history: List[Dict[str, float]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        for row in history:
            # rows of runs resumed from before the tta column have no level: left empty
            writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row.get(k), float) else row.get(k, ""))
                             for k in METRIC_FIELDS})
    os.replace(tmp, path)


def _run_name(cfg: TrainConfig) -> str:
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{cfg.model}-{cfg.dataset}"


def _load_data(cfg: TrainConfig, info: DistInfo):
    if cfg.download and info.enabled:
        # Rank 0 downloads (once); the others wait for it, then read the files it wrote.
        if info.is_main:
            load_dataset(cfg.dataset, root=cfg.data_dir, split="train", download=True)
        torch.distributed.barrier()
    kwargs = dict(root=cfg.data_dir, download=cfg.download and info.is_main)
    if cfg.dataset == "imagefolder":
        kwargs.update(image_size=cfg.image_size, val_fraction=cfg.val_fraction, seed=cfg.seed)
    train_set = load_dataset(cfg.dataset, split="train", **kwargs)
    test_set = load_dataset(cfg.dataset, split="test", **kwargs)
    if cfg.subset:
        train_set = train_set.subset(cfg.subset, seed=cfg.seed)
        test_set = test_set.subset(cfg.subset, seed=cfg.seed)
    return train_set, test_set


def _resume_state(cfg: TrainConfig) -> Tuple[TrainConfig, Dict[str, Any], Path]:
    run_dir = Path(cfg.resume)
    ckpt_path = run_dir / "last.pt" if run_dir.is_dir() else run_dir
    if run_dir.is_file():
        run_dir = run_dir.parent
    if not ckpt_path.is_file():
        raise CheckpointError(f"{run_dir}: nothing to resume (no last.pt)")
    state = load_checkpoint(ckpt_path)
    saved = TrainConfig.from_dict(state["config"])
    return saved, state, run_dir


def train(config: Union[TrainConfig, Dict[str, Any], None] = None, explicit: Optional[set] = None,
          **overrides) -> RunResult:
    """Train a model; the Python door to ``moderncnn train`` (same fields as the CLI flags).

    ``moderncnn.train(model="resnet18", dataset="cifar10", epochs=5)`` or ``train(TrainConfig(...))``.
    Returns a :class:`RunResult`; the run directory holds config.json, metrics.csv, the plots,
    report.md, last.pt and best.pt.
    """
    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    explicit = set(explicit or ()) | {k for k, v in overrides.items() if v is not None}
    resume_state = None
    if config.resume:
        saved, resume_state, run_dir = _resume_state(config)
        # Resume keeps the run's recipe; only the length and how it runs may change.
        changes = {k: getattr(config, k) for k in ("epochs", "progress", "device", "budget")
                   if k in explicit or (k == "epochs" and config.epochs is not None)}
        cfg = dataclasses.replace(saved, resume=str(run_dir), **changes)
        # Options added after the checkpoint was written take their defaults (they did not exist then).
        cfg = dataclasses.replace(cfg, **{k: v for k, v in DEFAULTS.items() if getattr(cfg, k) is None})
    else:
        cfg = resolve_config(config, explicit)
    try:
        return _train(cfg, resume_state)
    finally:
        cleanup_distributed()


def _agree(planned_steps: int, info: DistInfo) -> int:
    """Rank 0's plan for every rank: each measures its own times, but all must run the same steps."""
    return int(broadcast_object(int(planned_steps), info))


def _train(cfg: TrainConfig, resume_state: Optional[Dict[str, Any]]) -> RunResult:
    device = pick_device(cfg.device)
    info = setup_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    main = info.is_main
    torch.manual_seed(cfg.seed)
    amp_dtype = autocast_dtype(cfg.amp, device, source=f"recipe {cfg.recipe!r} uses --amp, which"
                               if RECIPES.get(cfg.recipe, {}).get("amp") is True else "--amp")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest kernels once

    # --- data -------------------------------------------------------------------------------------------
    if cfg.pretrained is True and not cfg.image_size:
        from ..models.pretrained import has_pretrained, preprocessing
        if has_pretrained(cfg.model):  # the resolution the ImageNet weights were trained at
            cfg = dataclasses.replace(cfg, image_size=preprocessing(cfg.model)["crop"])
    train_set, test_set = _load_data(cfg, info)
    channels = train_set.images.shape[1]
    native = train_set.images.shape[-1]
    image_size = cfg.image_size or native
    if cfg.normalize:
        mean, std = normalization_stats(train_set.images)
    else:
        mean, std = [0.0] * channels, [1.0] * channels
    if cfg.batch_size % info.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must be divisible by the "
                         f"{info.world_size} processes")
    per_rank_batch = cfg.batch_size // info.world_size

    # --- model ------------------------------------------------------------------------------------------
    model_kwargs = dict(cfg.model_kwargs)
    model = create_model(cfg.model, num_classes=train_set.num_classes, in_chans=channels,
                         pretrained=cfg.pretrained, **model_kwargs)
    if getattr(model, "transform_input", False):  # set by GoogLeNet's ImageNet weights: rebuild it the same way
        model_kwargs["transform_input"] = True
    side = model.min_input_size[1]
    if image_size < side:
        raise InputTooSmallError(f"{cfg.model} needs inputs of at least {side}x{side} pixels, but "
                                 f"{cfg.dataset} images are {image_size}x{image_size}; pass --image-size {side} "
                                 f"(or larger) to resize them")
    if 0 < cfg.progressive_size < side:
        raise InputTooSmallError(f"{cfg.model} needs inputs of at least {side}x{side} pixels; "
                                 f"--progressive-size {cfg.progressive_size} is smaller")
    if cfg.init == "xavier" and not cfg.pretrained:
        xavier_init(model)
    elif cfg.init == "whiten" and not cfg.pretrained and resume_state is None:
        whiten_first_conv(model, train_set.images, mean, std, image_size=image_size)
    frozen_note = ""
    head_names: List[str] = []
    head_lr_mult = cfg.head_lr_mult or 1.0
    if cfg.pretrained or cfg.freeze_backbone:
        from ..models.pretrained import classifier_names, freeze_backbone
        head_names = classifier_names(model)
        if cfg.freeze_backbone:
            frozen_note = freeze_backbone(model, head_names)
        else:
            head_lr_mult = cfg.head_lr_mult or 10.0  # new head learns fast, pretrained backbone slowly
            frozen_note = (f"all parameters; classifier ({', '.join(head_names)}) at {head_lr_mult:g}x the "
                           f"learning rate of the pretrained backbone")
    if getattr(model, "pretrained_cfg", None) and cfg.normalize:
        mean, std = list(model.pretrained_cfg["mean"]), list(model.pretrained_cfg["std"])
    params = count_parameters(model)
    trainable = count_parameters(model, trainable_only=True)
    flops = summary(model, (1, channels, image_size, image_size)).total_flops
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if info.enabled and cfg.sync_bn:
        if device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    net: nn.Module = model
    if info.enabled:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    train_loader = Loader(train_set, per_rank_batch, train=True, augment=cfg.augment, image_size=image_size,
                          device=device, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
                          mean=mean, std=std, channels_last=cfg.channels_last)
    test_loader = Loader(test_set, max(per_rank_batch, 256), train=False, image_size=image_size, device=device,
                         rank=info.rank, world_size=info.world_size, mean=mean, std=std,
                         channels_last=cfg.channels_last)
    steps_per_epoch = len(train_loader)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum,
                                head_lr_mult=head_lr_mult, head_names=head_names, muon_lr=cfg.muon_lr)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.epochs * steps_per_epoch,
                                int(round(cfg.warmup * steps_per_epoch)))
    ema = None
    if cfg.ema:
        from torch.optim.swa_utils import AveragedModel
        ema = AveragedModel(model, multi_avg_fn=ema_warmup_fn(cfg.ema), use_buffers=True)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    # --- run directory and resume ---------------------------------------------------------------------
    start_epoch, start_step = 0, 0
    history: List[Dict[str, float]] = []
    best_acc, partial, loader_rng = 0.0, None, None
    if resume_state is not None:
        run_dir = Path(cfg.resume)
        load_model_state(model, resume_state, source=str(run_dir / "last.pt"))
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        # The schedule is rebuilt for the (possibly longer) new run; its position carries over.
        scheduler.lr_lambdas[0].total = cfg.epochs * steps_per_epoch
        if ema is not None and resume_state.get("ema") is not None:
            ema.load_state_dict(resume_state["ema"])
        start_epoch, start_step = int(resume_state["epoch"]), int(resume_state.get("step", 0))
        history = list(resume_state.get("history", []))[:start_epoch]
        best_acc = float(resume_state.get("best_acc", 0.0))
        partial = resume_state.get("partial")
        loader_rng = resume_state.get("loader_rng")
        torch.set_rng_state(resume_state["rng"]["torch"])
        if device.type == "cuda" and resume_state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(resume_state["rng"]["cuda"], device)
    else:
        run_dir = Path(broadcast_object(str(Path(cfg.out) / (cfg.name or _run_name(cfg))), info))
        if main:
            if (run_dir / "last.pt").exists():
                raise ValueError(f"{run_dir} already holds a run; use --resume {run_dir} or another --name")
            run_dir.mkdir(parents=True, exist_ok=True)
    if start_epoch >= cfg.epochs:
        raise ValueError(f"{run_dir} already finished {start_epoch} epochs; pass a larger --epochs to continue")
    # A time budget plans the number of steps (at most cfg.epochs epochs) from measured times; the schedule
    # and progressive resizing follow the plan, whose last epoch may be partial (see budget.py). Without
    # one, the plan is cfg.epochs whole epochs.
    planner, planned_steps = None, cfg.epochs * steps_per_epoch

    def replan(committed: int, spent: float, current: Optional[int] = None) -> int:
        new_plan = _agree(planner.plan(committed, spent, current), info)
        scheduler.lr_lambdas[0].total = new_plan
        return new_plan

    def planned_epochs() -> int:
        return -(-planned_steps // steps_per_epoch)

    def planned_steps_in(epoch: int) -> int:  # below steps_per_epoch for a budget's partial last epoch
        return min(steps_per_epoch, planned_steps - epoch * steps_per_epoch)

    def evaluation_seconds_after(epoch: int) -> float:  # the planner's price of epoch's evaluation, if it has one
        return planner.evaluation_seconds() if evaluates_after(epoch, planned_epochs(), cfg.eval_every) else 0.0

    if cfg.budget:
        planner = EpochPlanner(cfg.budget, cfg.epochs, image_size, cfg.progressive_size, cfg.progressive_fraction,
                               train_images=len(train_set), test_images=len(test_set),
                               final_views=TTA_VIEWS[int(cfg.tta or 0)], steps_per_epoch=steps_per_epoch,
                               eval_every=cfg.eval_every)
        planner.record_history(history)  # a resumed run plans from the epochs it has done
        planned_steps = replan(start_epoch + 1, sum(r["seconds"] for r in history))

    precision = _precision(amp_dtype)
    config_record = dataclasses.asdict(cfg)
    meta = {"model_name": cfg.model, "model_kwargs": model_kwargs, "num_classes": train_set.num_classes,
            "in_chans": channels, "classes": list(train_set.classes), "image_size": image_size,
            "native_size": list(train_set.images.shape[-2:]),
            "normalization": {"mean": mean, "std": std}, "dataset": cfg.dataset}
    if main:
        _write_json(run_dir / "config.json", {
            "config": config_record, "resolved_from_recipe": cfg.recipe, "versions": _versions(device),
            "seed": cfg.seed, "world_size": info.world_size, "params": params, "trainable_params": trainable,
            "flops_per_image": flops, "train_images": len(train_set), "test_images": len(test_set),
            "frozen": frozen_note, "precision": precision, **meta})

    def checkpoint_state(epoch: int, step: int, partial_metrics=None, rng_state=None) -> Dict[str, Any]:
        return {**meta, "config": config_record, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "epoch": epoch, "step": step,
                "history": history, "best_acc": best_acc, "partial": partial_metrics, "loader_rng": rng_state,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}

    def resume_hint() -> str:
        return f"moderncnn train --resume {shlex.quote(str(run_dir))} --epochs {cfg.epochs}"

    if main:
        mode = "resuming" if resume_state is not None else "training"
        length = f"{cfg.epochs} epochs"
        if cfg.budget:
            length = (f"time budget {cfg.budget:.0f}s (epochs planned from measured times"
                      f"{f', at most {cfg.epochs}' if cfg.epochs < BUDGET_MAX_EPOCHS else ''})")
        print(f"{mode} {cfg.model} ({params:,} params, {flops / 1e6:.1f} MFLOPs/image) on {cfg.dataset} "
              f"({len(train_set):,} train / {len(test_set):,} test, {image_size}x{image_size}) | recipe {cfg.recipe}: "
              f"{describe_optimizer(cfg.optimizer, cfg.lr, cfg.momentum, cfg.muon_lr)}, {cfg.schedule}, "
              f"batch {cfg.batch_size}, {length}"
              f"{f' (the first trained from {cfg.progressive_size}x{cfg.progressive_size} up)' if 0 < cfg.progressive_size < image_size else ''} | "
              f"{device}{f' x{info.world_size}' if info.enabled else ''}, {precision} -> {run_dir}", flush=True)

    show_bar = main and cfg.progress and sys.stdout.isatty()
    defer_check = device.type == "cuda"
    eval_model = ema.module if ema is not None else model
    train_seconds = sum(row["seconds"] for row in history)
    global_step = start_epoch * steps_per_epoch + start_step
    final_predictions = None
    evaluations_timed = 0

    with _StopFlag() as stop:
        epoch = start_epoch - 1
        while epoch + 1 < planned_epochs():
            epoch += 1
            net.train()
            keep_frozen_norms_in_eval(model)
            epoch_start = time.perf_counter()
            side = train_side(epoch, planned_epochs(), image_size, cfg.progressive_size, cfg.progressive_fraction)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = torch.zeros((), dtype=torch.int64, device=device)
            elapsed_before = 0.0
            first_step = start_step if epoch == start_epoch else 0
            if partial is not None and epoch == start_epoch:
                loss_sum += partial["loss_sum"]
                correct += partial["correct"]
                seen += partial["seen"]
                elapsed_before = partial["seconds"]
            batches = train_loader.iterate(epoch, first_step, loader_rng if epoch == start_epoch else None)
            bar = None
            if show_bar:
                from tqdm import tqdm
                bar = tqdm(total=planned_steps_in(epoch), initial=first_step,
                           desc=f"epoch {epoch + 1}/{planned_epochs()}",
                           unit="batch", leave=False, dynamic_ncols=True)
            unchecked = None  # on CUDA: (loss, where) of the step whose finiteness is not yet checked
            # A budgeted run's clock starts after the epoch's first two steps (on a GPU the first steps at a
            # new size search cuDNN's kernels, a one-time cost that would make every later epoch look slower).
            warm_from = None  # (time, step) where it started
            early_plan_step = None  # an unmeasured run plans from its first ten timed steps, mid-epoch
            if planner is not None and not planner.measured:
                early_plan_step = min(first_step + 11, steps_per_epoch - 2)
                if early_plan_step <= first_step + 1:  # too short an epoch: plan at its end
                    early_plan_step = None
            last_step = first_step - 1  # the last step taken in this epoch
            for step, (x, y) in enumerate(batches, start=first_step):
                if step >= planned_steps_in(epoch):
                    break
                if side != image_size:  # progressive resizing: the augmented batch, shrunk
                    x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits, loss = _loss(net(x), y, criterion)
                where = (epoch, step, global_step, scheduler.get_last_lr()[0])
                if defer_check:
                    # Reading a CUDA loss waits for the GPU; checking the previous step's loss after
                    # this one is queued keeps a step of work in flight.
                    if unchecked is not None:
                        _check_finite(*unchecked, run_dir)
                    unchecked = (loss.detach(), where)
                else:
                    _check_finite(loss, where, run_dir)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                if ema is not None:
                    ema.update_parameters(model)
                global_step += 1
                last_step = step
                if planner is not None and step == first_step + 1:
                    warm_from = (time.perf_counter(), step)
                if step == early_plan_step:
                    per_step = (time.perf_counter() - warm_from[0]) / (step - warm_from[1])
                    planner.record_train(side, per_step * steps_per_epoch, planner.train_images, provisional=True)
                    planned_steps = replan(epoch + 1, train_seconds + planner.epoch_train_seconds(side)
                                           + evaluation_seconds_after(epoch))
                    if bar is not None:
                        bar.set_description(f"epoch {epoch + 1}/{planned_epochs()}")
                        bar.total = planned_steps_in(epoch)
                loss_sum += loss.detach().double() * y.numel()
                correct += (logits.argmax(1) == y).sum()
                seen += y.numel()
                if bar is not None:
                    bar.update(1)
                    if step % 10 == 0 or step == steps_per_epoch - 1:
                        spent = elapsed_before + time.perf_counter() - epoch_start
                        bar.set_postfix(loss=f"{loss_sum.item() / seen.item():.4f}",
                                        acc=f"{correct.item() / seen.item():.4f}",
                                        img_s=f"{seen.item() * info.world_size / max(spent, 1e-9):.0f}")
                if stop.signum is not None:
                    if bar is not None:
                        bar.close()
                    if unchecked is not None:  # never save the weights of a non-finite step
                        _check_finite(*unchecked, run_dir)
                    partial_metrics = {"loss_sum": loss_sum.cpu(), "correct": correct.cpu(), "seen": seen.cpu(),
                                       "seconds": elapsed_before + time.perf_counter() - epoch_start}
                    # Resume continues after this step (after the evaluation, if it was the epoch's last).
                    if main:
                        save_checkpoint(checkpoint_state(epoch, step + 1, partial_metrics,
                                                         train_loader.generator.get_state()), run_dir / "last.pt")
                    name = "SIGINT" if stop.signum == signal.SIGINT else "SIGTERM"
                    code = 130 if stop.signum == signal.SIGINT else 143
                    message = (f"{name}: stopped at epoch {epoch + 1}, step {step + 1}; saved {run_dir / 'last.pt'}.\n"
                               f"resume with: {resume_hint()}")
                    raise TrainingInterrupted(message, code, run_dir)
            if bar is not None:
                bar.close()
            if unchecked is not None:
                _check_finite(*unchecked, run_dir)
            train_time = elapsed_before + time.perf_counter() - epoch_start
            for t in (loss_sum, correct, seen):
                all_reduce_sum(t, info)
            train_loss, train_acc = loss_sum.item() / seen.item(), correct.item() / seen.item()
            # Test-time augmentation costs a forward pass per view, so the epochs in between are scored on
            # the plain images and only the last one (the reported final accuracy) with ``cfg.tta``.
            if planner is not None:  # plan again with this epoch's time (its evaluation as the last one's)
                if warm_from is not None and last_step - warm_from[1] >= 2:
                    per_step = (time.perf_counter() - warm_from[0]) / (last_step - warm_from[1])
                    planner.record_train(side, per_step * steps_per_epoch, planner.train_images)
                else:
                    planner.record_train(side, train_time, int(seen.item()))
                planned_steps = replan(epoch + 1, train_seconds + train_time + evaluation_seconds_after(epoch),
                                       planned_steps)
            # Should the plan have been too long, the epoch that passes the budget is the last.
            budget_spent = torch.tensor(int(bool(cfg.budget and train_seconds + train_time >= cfg.budget)),
                                        device=device)
            all_reduce_sum(budget_spent, info)  # every rank stops after the same epoch
            last_epoch = epoch + 1 >= planned_epochs() or budget_spent.item() > 0
            eval_start = time.perf_counter()
            tta_level = int(cfg.tta or 0) if last_epoch else 0
            # --eval-every N: the epochs in between have no test figures (None; empty in metrics.csv).
            evaluated = last_epoch or evaluates_after(epoch, planned_epochs(), cfg.eval_every)
            test_loss = test_acc = None
            if last_epoch and main and not info.enabled:  # keep the predictions for the report
                test_loss, test_acc, *final_predictions = evaluate(
                    eval_model, test_loader, tta=tta_level, amp_dtype=amp_dtype, return_predictions=True)
            elif evaluated:
                test_loss, test_acc = evaluate(eval_model, test_loader, tta=tta_level, amp_dtype=amp_dtype, info=info)
            seconds = time.perf_counter() - epoch_start + elapsed_before
            if planner is not None and evaluated and not tta_level:
                # The first evaluation carries one-time costs (kernel search for the test batches).
                planner.record_eval(time.perf_counter() - eval_start, warm=evaluations_timed > 0)
                evaluations_timed += 1
            row = {"epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc, "test_loss": test_loss,
                   "test_acc": test_acc, "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
                   "images_per_second": seen.item() / max(train_time, 1e-9), "tta": tta_level,
                   "train_size": side, "train_images": int(seen.item())}
            history.append(row)
            train_seconds += seconds
            improved = evaluated and test_acc > best_acc
            best_acc = max(best_acc, test_acc) if evaluated else best_acc
            partial, loader_rng = None, None
            if main:
                _write_metrics(run_dir / "metrics.csv", history)
                state = checkpoint_state(epoch + 1, 0)
                save_checkpoint(state, run_dir / "last.pt")
                if improved:
                    best = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "ema")}
                    if ema is not None:
                        best["model"] = ema.module.state_dict()
                    save_checkpoint(best, run_dir / "best.pt")
                fraction = (last_step + 1) / steps_per_epoch  # below 1 for a budget's partial last epoch
                scores = (f"test loss {test_loss:.4f} acc {test_acc:.4f}" if evaluated
                          else f"{'(test set not scored)':<27}")  # as wide as the figures
                print(f"epoch {epoch + 1:3d}/{planned_epochs()}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                      f"{scores}  lr {row['lr']:.4g}  "
                      f"{seconds:.1f}s  {row['images_per_second']:.0f} img/s"
                      f"{f'  (trained at {side}x{side})' if side != image_size else ''}"
                      f"{f'  ({fraction:.0%} of the training set)' if fraction < 1 else ''}", flush=True)
            if last_epoch and cfg.budget:
                if main:
                    done = f"{epoch + fraction:.2f}" if fraction < 1 else f"{epoch + 1}"
                    print(f"time budget of {cfg.budget:.0f}s: {train_seconds:.0f}s used by {done} "
                          f"epoch{'s' if epoch else ''}; stopping", flush=True)
                break

    result = RunResult(run_dir, cfg, history, best_acc, history[-1]["test_acc"] if history else 0.0,
                       train_seconds, params, flops)
    if main:
        _finish_run(eval_model, test_set, test_loader, cfg, run_dir, result, amp_dtype, final_predictions)
    if info.enabled:
        # The other ranks wait for rank 0's report before the process group is torn down: a gloo rank
        # that left while rank 0 was still writing was seen to abort ("terminate called without an
        # active exception"), and torchrun then killed rank 0 and failed the job.
        torch.distributed.barrier()
    return result


def _finish_run(model, test_set, test_loader, cfg, run_dir: Path, result: RunResult, amp_dtype,
                final_predictions=None) -> None:
    """Predictions of the final model on the whole test set (those of the last epoch's evaluation where it
    saw the whole set in this process), then plots and report.md."""
    from ..report.run import write_run_report
    if final_predictions:
        preds, probs = final_predictions
        acc = result.final_acc
    else:
        full = Loader(test_set, test_loader.batch_size, train=False, image_size=test_loader.image_size,
                      device=test_loader.device, mean=test_loader.mean_values, std=test_loader.std_values,
                      channels_last=test_loader.channels_last)
        _, acc, preds, probs = evaluate(model, full, tta=int(cfg.tta or 0), amp_dtype=amp_dtype,
                                        return_predictions=True)
    # A fixed random sample (seed 0) for the prediction grid: image folders are sorted by class, so the
    # first 32 test images would all show one class.
    sample = torch.randperm(len(test_set), generator=torch.Generator().manual_seed(0))[:32].sort().values
    torch.save({"labels": test_set.labels, "predictions": preds, "confidence": probs.max(1).values,
                "classes": list(test_set.classes), "sample_images": test_set.images[sample].clone(),
                "sample_index": sample, "test_acc": acc}, run_dir / "predictions.pt")
    _write_json(run_dir / "summary.json", {
        "model": cfg.model, "dataset": cfg.dataset, "recipe": cfg.recipe, "params": result.params,
        "flops_per_image": result.flops, "epochs_done": len(result.history),
        "epochs_planned": len(result.history) if cfg.budget else cfg.epochs,
        "final_acc": result.final_acc, "best_acc": result.best_acc, "train_seconds": result.train_seconds,
        "images_per_second": sum(r["images_per_second"] for r in result.history) / len(result.history),
        "peak_memory_mb": _peak_memory_mb(test_loader.device), "tta": int(cfg.tta or 0),
        "precision": _precision(amp_dtype)})
    write_run_report(run_dir)
    print(f"done: final test accuracy {result.final_acc:.4f}, best {result.best_acc:.4f}, "
          f"{result.train_seconds:.0f}s; report: {run_dir / 'report.md'}", flush=True)


def _peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this run: CUDA's max allocated on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10
    except ImportError:  # Windows
        return float("nan")


# --- using a trained model ------------------------------------------------------------------------------
def build_model_from_checkpoint(state: Dict[str, Any], source: str = "checkpoint") -> nn.Module:
    model = create_model(state["model_name"], num_classes=state["num_classes"], in_chans=state["in_chans"],
                         **state.get("model_kwargs", {}))
    load_model_state(model, state, source)
    model.classes = list(state.get("classes", []))
    model.preprocessing = {"image_size": state.get("image_size"), **state.get("normalization", {})}
    return model.eval()


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> nn.Module:
    """A trained model from a run directory (its best.pt) or a checkpoint file, in eval mode.

    The model carries ``.classes`` and ``.preprocessing`` (image size, mean, std) from training.
    """
    ckpt = resolve_checkpoint(path)
    model = build_model_from_checkpoint(load_checkpoint(ckpt), str(ckpt))
    return model.to(device)
