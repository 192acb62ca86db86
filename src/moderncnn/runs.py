"""The run directory: what a training run writes and how everything else reads it.

A run directory holds ``config.json`` (:class:`RunInfo`: the resolved :class:`TrainConfig`, the model and
its preprocessing, the data sizes, the software), ``metrics.csv`` (one :class:`EpochRecord` per epoch),
``summary.json`` (:class:`RunSummary`, written when the run ends), the checkpoints ``last.pt`` and, when the
run held out a validation set, ``best.pt``, plus the plots and ``report.md``.

Every file carries ``format_version``. Files of version 1 (written before validation splits existed) are
migrated on reading; any other version fails with one line naming the file and both versions. Evaluation,
prediction, export, the report and comparisons read runs only through :func:`load_run` and
:func:`load_model`.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import io
import json
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, write_text_atomic

__all__ = ["FORMAT_VERSION", "UsageError", "ModerncnnWarning", "RunFileError", "RunFormatError", "AMP_CHOICES",
           "normalize_amp", "TrainConfig", "ModelSpec", "RunInfo", "EpochRecord", "RunSummary", "Run", "load_run",
           "load_model", "build_model", "load_model_state", "resolve_checkpoint", "read_checkpoint", "write_config",
           "write_metrics", "read_metrics", "read_json_file", "read_safetensors", "write_summary", "run_name",
           "software_versions", "peak_memory_mb", "METRIC_FIELDS", "check_version", "epochs_trained"]

FORMAT_VERSION = 3  # 3: the data fingerprint and the amp values auto/bf16/fp16/off (2 is migrated on reading)


class UsageError(ValueError):
    """A bad value or combination of options: the command line exits 2 for it (1 for failures at run time)."""


class ModerncnnWarning(UserWarning):
    """A warning of moderncnn's own; the command line prints it as ``moderncnn: warning: ...``."""


class RunFileError(ValueError):
    """A run file (config.json, metrics.csv, summary.json, compare.json) that cannot be read: the message names
    the file and what is wrong with it."""


class RunFormatError(RunFileError):
    """A run file of a format this version of moderncnn cannot read."""


AMP_CHOICES = ("auto", "bf16", "fp16", "off")  # what --amp takes
_AMP_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "fp32": "off", "float32": "off",
                "none": "off", "false": "off", "true": "auto"}


def normalize_amp(value: Union[bool, str, None], source: str = "amp") -> str:
    """One of :data:`AMP_CHOICES`. Run files of format 2 hold True, False or "auto": True asked for bfloat16
    where the device has it natively (it refused to run elsewhere), which is what "auto" does there."""
    if value is None or value is True:
        return "auto"
    if value is False:
        return "off"
    text = str(value).strip().lower()
    text = _AMP_ALIASES.get(text, text)
    if text not in AMP_CHOICES:
        raise UsageError(f"{source} must be one of {', '.join(AMP_CHOICES)}, got {value!r}")
    return text


def _option(help: str, **cli) -> Any:
    """A :class:`TrainConfig` field left to the recipe (``None``), with its command-line help."""
    return field(default=None, metadata={"help": help, **cli})


@dataclass
class TrainConfig:
    """Everything that defines a training run. A field left ``None`` is filled from the recipe, then from
    the defaults (``train.config.resolve_config``); the command-line flags are these fields."""

    model: Optional[str] = _option("registered model name")
    dataset: str = field(default="fashion-mnist", metadata={"help": "fashion-mnist, mnist, cifar10 or imagefolder"})
    data_dir: Optional[str] = _option("where the dataset is (image folders: DIR/train, DIR/test, optional DIR/val)")
    download: bool = field(default=False, metadata={"help": "download the dataset if it is missing"})
    image_size: Optional[int] = _option("resize images to this side (d2l: 96 or 224)")
    epochs: Optional[int] = _option("number of epochs (with --budget: the most)")
    batch_size: Optional[int] = _option("global batch size (all processes together)")
    lr: Optional[float] = _option("peak learning rate (not rescaled for you)")
    optimizer: Optional[str] = _option("muon: Muon for the conv filters, SGD (--lr) for the rest")
    muon_lr: Optional[float] = _option("peak learning rate of the conv filters under --optimizer muon")
    momentum: Optional[float] = _option("momentum (Nesterov for SGD and Muon)")
    muon_momentum: Optional[float] = _option("momentum of the conv filters under --optimizer muon (unset: "
                                             "--momentum)")
    muon_normalize: Optional[bool] = _option("under --optimizer muon, rescale each filter bank to norm "
                                             "sqrt(out_channels) before its step (airbench)")
    bias_lr: Optional[float] = _option("peak learning rate of norms and biases (unset: --lr)")
    first_conv_bias_epochs: Optional[float] = _option(
        "train the first convolution's bias for these first epochs only, its learning rate decaying to zero "
        "over them (airbench's whitening bias; 0: all epochs)")
    schedule: Optional[str] = _option("learning-rate schedule, stepped every batch")
    warmup: Optional[float] = _option("linear warm-up length in epochs")
    weight_decay: Optional[float] = _option("weight decay (not on norms and biases)")
    label_smoothing: Optional[float] = _option("label smoothing of the cross-entropy loss")
    ema: Optional[float] = _option("decay of an exponential moving average of the weights (0: off)")
    grad_clip: Optional[float] = _option("clip the gradient norm to this (0: off)")
    augment: Optional[str] = _option("none, crop, flip, crop+flip, crop+flip+erase, rrc+flip (random-resized-crop; "
                                     "the default with --pretrained); altflip in place of flip flips each image "
                                     "every other epoch")
    rrc_scale: Optional[str] = _option("random-resized-crop: the range of the image's area a crop covers, LOW,HIGH")
    normalize: Optional[bool] = _option("normalise inputs with the training set's mean and std")
    init: Optional[str] = _option("weight initialisation: xavier (d2l) or whiten (patch-whitening first conv)")
    model_kwargs: Dict[str, Any] = field(default_factory=dict, metadata={
        "help": "constructor argument of the model, e.g. small_input=True (repeatable)"})
    subset: Optional[int] = _option("use at most N train and N test images")
    val_split: Optional[float] = _option("hold out a class-stratified validation set from the training images: "
                                         "a count, or a fraction below 1; it chooses best.pt")
    recipe: str = field(default="fast", metadata={"help": "a named recipe, or a JSON file of training options"})
    seed: int = field(default=0, metadata={"help": "fixes data order, augmentation and initialisation"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps"})
    amp: str = field(default="auto", metadata={
        "help": "mixed precision: auto (bfloat16 where the device has it natively, float16 + GradScaler on GPUs "
                "without it, else float32), bf16, fp16 (with a GradScaler, any device) or off; --amp alone is "
                "auto, --no-amp off"})
    fp32_precision: str = field(default="highest", metadata={
        "help": "float32 matrix products: highest, high (TF32 on Ampere and later GPUs) or medium (bfloat16 "
                "inside oneDNN and TF32 on GPUs)"})
    channels_last: Optional[bool] = _option("channels-last memory format")
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    out: str = field(default="runs", metadata={"help": "parent directory of run directories"})
    name: Optional[str] = _option("run directory name (default: time-model-dataset)")
    resume: Optional[str] = _option("continue the run in this directory from its last.pt")
    progress: bool = field(default=True, metadata={"help": "progress bar (in a terminal or a notebook)"})
    quiet: bool = field(default=False, metadata={"help": "print only the final line"})
    tensorboard: bool = field(default=False, metadata={
        "help": "write TensorBoard event files to RUN/tensorboard/ (pip install 'moderncnn[tensorboard]')"})
    tta: Optional[int] = _option("test-time augmentation of the final evaluation: 1 (the flag alone) flip, "
                                 "2 flip + one-pixel shifts, 0 off")
    tta_below: Optional[float] = _option("give the TTA views only to the test images whose plain top probability "
                                         "is under this (selective TTA; 1: every image)")
    budget: Optional[float] = _option("train for about this long (90s, 10m, 1.5h or seconds): the epochs are "
                                      "planned from measured times so the schedule ends with the budget")
    sync_bn: bool = field(default=False, metadata={"help": "SyncBatchNorm under torchrun (CUDA)"})
    pretrained: Any = field(default=False, metadata={
        "help": "start from torchvision's ImageNet weights (the flag alone) or a local state-dict file"})
    freeze_backbone: bool = field(default=False, metadata={"help": "train the classifier only"})
    head_lr_mult: Optional[float] = _option("learning-rate factor of the classifier (pretrained: 10)")
    val_fraction: Optional[float] = _option("image folders without test/: the share held out as the test set")
    resize: str = field(default="crop", metadata={
        "help": "image folders: crop (the shorter side to the size, then the centre), squash, or pad"})
    data_cache: str = field(default="auto", metadata={
        "help": "image folders: decoded images in memory, memory-mapped from disk, or auto (disk when a split "
                "would take over a quarter of the RAM)"})
    cache_dir: Optional[str] = _option("where decoded image folders are cached ($MODERNCNN_CACHE, else "
                                       "~/.cache/moderncnn)")
    decode_workers: Optional[int] = _option("image folders: processes decoding the files (all cores)")
    strict_data: bool = field(default=False, metadata={
        "help": "image folders: stop at the first unreadable file instead of skipping it"})
    progressive_size: Optional[int] = _option("progressive resizing: train the first epochs at this smaller side, "
                                              "growing in 4-pixel steps to the full size (0: off)")
    progressive_fraction: Optional[float] = _option("share of the epochs progressive resizing spends below the "
                                                    "full size")
    eval_every: Optional[int] = _option("score validation and test sets after every N-th epoch and after the "
                                        "last (0: the last only)")

    def __post_init__(self):
        self.amp = normalize_amp(self.amp)

    def describe_optimizer(self) -> str:
        """``sgd lr 0.2 momentum 0.9``; under Muon both learning rates and which parameters take which."""
        sgd = f"sgd lr {self.lr:g} momentum {self.momentum:g}"
        biases = (f"norms and biases at lr {self.bias_lr:g}" if self.bias_lr is not None and self.bias_lr != self.lr
                  else "")
        if self.first_conv_bias_epochs:
            limit = f"the first convolution's bias for {self.first_conv_bias_epochs:g} epochs only"
            biases = f"{biases}, {limit}" if biases else limit
        if self.optimizer == "sgd":
            return f"{sgd} ({biases})" if biases else sgd
        if self.optimizer == "muon":
            momentum = self.momentum if self.muon_momentum is None else self.muon_momentum
            rest = f"the rest; {biases}" if biases else "the rest"
            return f"muon lr {self.muon_lr:g} momentum {momentum:g} (conv filters) + {sgd} ({rest})"
        return f"{self.optimizer} lr {self.lr:g}"

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "training options") -> "TrainConfig":
        """A config from plain data; an unknown field fails naming it and the closest valid one."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise UsageError(f"{source}: unknown field {key!r}{hint}")
        return cls(**data)


@dataclass
class ModelSpec:
    """How to rebuild a trained model and feed it: the registered name, constructor arguments, classes and
    the preprocessing training used (size, mean, std)."""

    model_name: str
    num_classes: int
    in_chans: int
    image_size: int
    classes: List[str]
    mean: List[float]
    std: List[float]
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    native_size: Optional[List[int]] = None  # the dataset's stored image size (H, W)
    dataset: str = ""
    resize: str = "crop"  # how image files were brought to native_size (runs of format 1 squashed them)
    eval_crop: bool = False  # evaluation cuts the centre image_size out of native_size (random-resized-crop runs)

    def to_dict(self) -> Dict[str, Any]:
        """The flat keys a checkpoint and config.json carry."""
        return {"model_name": self.model_name, "model_kwargs": dict(self.model_kwargs),
                "num_classes": self.num_classes, "in_chans": self.in_chans, "classes": list(self.classes),
                "image_size": self.image_size, "native_size": self.native_size,
                "normalization": {"mean": list(self.mean), "std": list(self.std)}, "dataset": self.dataset,
                "resize": self.resize, "eval_crop": self.eval_crop}

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "ModelSpec":
        # a checkpoint nests mean and std under "normalization"; an export's JSON holds them at the top
        norm = data.get("normalization") or {"mean": data.get("mean"), "std": data.get("std")}
        channels = int(data["in_chans"])
        return cls(model_name=data["model_name"], num_classes=int(data["num_classes"]), in_chans=channels,
                   image_size=int(data["image_size"]), classes=[str(c) for c in data.get("classes") or []],
                   mean=list(norm.get("mean") or [0.0] * channels), std=list(norm.get("std") or [1.0] * channels),
                   model_kwargs=dict(data.get("model_kwargs") or {}),
                   native_size=list(data["native_size"]) if data.get("native_size") else None,
                   dataset=data.get("dataset") or "", resize=data.get("resize") or "squash",
                   eval_crop=bool(data.get("eval_crop")))


@dataclass
class RunInfo:
    """config.json: the resolved config and what the run was made of."""

    config: TrainConfig
    spec: ModelSpec
    params: int = 0
    trainable_params: int = 0
    flops_per_image: int = 0
    train_images: int = 0
    val_images: int = 0
    test_images: int = 0
    validation: str = ""  # where the validation set came from ("" without one)
    data_storage: str = "memory"  # "disk": an image folder's decoded cache, memory-mapped
    skipped_files: int = 0  # image-folder files that could not be decoded
    frozen: str = ""
    precision: str = "float32"
    world_size: int = 1
    versions: Dict[str, str] = field(default_factory=dict)
    data_fingerprint: Optional[Dict[str, Any]] = None  # {split: what identifies its data}; None before format 3
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> Dict[str, Any]:
        out = {"format_version": self.format_version, "config": dataclasses.asdict(self.config),
               "resolved_from_recipe": self.config.recipe, "seed": self.config.seed, **self.spec.to_dict()}
        out.update({k: getattr(self, k) for k in _INFO_FIELDS})
        return out

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "config.json") -> "RunInfo":
        version = check_version(data.get("format_version", 1), source)
        with _naming(source):
            if not isinstance(data.get("config"), dict):
                raise RunFileError(f"{source}: no \"config\" object (the run's training options)")
            config = TrainConfig.from_dict(_migrate_config(data["config"], version), source)
            kept = {k: data[k] for k in _INFO_FIELDS if data.get(k) is not None}
            return cls(config=config, spec=ModelSpec.from_dict(data), **kept)


_INFO_FIELDS = ("params", "trainable_params", "flops_per_image", "train_images", "val_images", "test_images",
                "validation", "data_storage", "skipped_files", "frozen", "precision", "world_size", "versions",
                "data_fingerprint")


def _migrate_config(config: Dict[str, Any], version: int) -> Dict[str, Any]:
    config = dict(config)  # version 1 lacks val_split: its default (None) is what those runs did
    if version == 1:
        config.setdefault("resize", "squash")  # how version 1 resized image folders
    config.setdefault("tta_below", 1.0)  # runs written before selective TTA gave every test image the views
    return config


@contextlib.contextmanager
def _naming(source):
    """Any failure to make sense of ``source``'s contents becomes one :class:`RunFileError` naming it."""
    try:
        yield
    except RunFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        what = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc).strip().splitlines()[0]
        raise RunFileError(f"{source}: damaged ({what})") from None


def check_version(found, source) -> int:
    """The file's format version, if this moderncnn reads it (the current one, or 1, which it migrates)."""
    try:
        found = int(found)
    except (TypeError, ValueError):
        found = -1
    if found not in (1, 2, FORMAT_VERSION):
        from ._version import __version__
        raise RunFormatError(f"{source}: format_version {found}, but moderncnn {__version__} reads format_version "
                             f"{FORMAT_VERSION} (and migrates 1 and 2)")
    return found


METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr", "seconds",
                 "images_per_second", "tta", "train_size", "train_images", "skipped_steps", "format_version"]


@dataclass
class EpochRecord:
    """One row of metrics.csv. Validation and test figures are ``None`` on epochs not scored
    (``--eval-every``) and validation ones on runs without a validation set."""

    epoch: int
    train_loss: float
    train_acc: float
    lr: float
    seconds: float
    images_per_second: float
    train_images: int = 0
    train_size: int = 0  # the side trained at (below the full size under progressive resizing)
    tta: int = 0  # the test-time augmentation level of this epoch's test figures
    skipped_steps: int = 0  # float16 steps the gradient scaler skipped (overflowing gradients)
    val_loss: Optional[float] = None
    val_acc: Optional[float] = None
    test_loss: Optional[float] = None
    test_acc: Optional[float] = None

    @property
    def scored(self) -> bool:
        return self.test_acc is not None

    def to_row(self) -> Dict[str, Any]:
        row = {k: getattr(self, k) for k in METRIC_FIELDS if k != "format_version"}
        row = {k: ("" if v is None else f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        return {**row, "format_version": FORMAT_VERSION}

    @classmethod
    def from_row(cls, row: Dict[str, Any], source: str = "metrics.csv") -> "EpochRecord":
        """From a metrics.csv row (strings) or a checkpoint's history entry; absent figures are None. A row
        cut short or holding text where a number belongs fails naming ``source``."""
        if None in row or any(v is None for k, v in row.items() if k in _REQUIRED_METRICS):
            raise RunFileError(f"{source}: damaged (a row with {'too many' if None in row else 'too few'} fields)")
        kinds = {f.name: f.type for f in dataclasses.fields(cls)}
        values = {}
        for key, kind in kinds.items():
            value = row.get(key)
            if value in (None, ""):
                continue
            try:
                values[key] = int(float(value)) if kind in ("int", int) else float(value)
            except (TypeError, ValueError):
                raise RunFileError(f"{source}: damaged ({key} is {value!r}, not a number)") from None
        values.setdefault("train_images", 0)
        missing = [k for k in _REQUIRED_METRICS if k not in values]
        if missing:
            raise RunFileError(f"{source}: damaged (a row without {', '.join(missing)})")
        return cls(**values)


_REQUIRED_METRICS = ("epoch", "train_loss", "train_acc", "lr", "seconds", "images_per_second")


def epochs_trained(history: List[EpochRecord], train_images: int = 0, batch_size: int = 1) -> Tuple[float, int, int]:
    """(epochs trained, images of the last epoch, images of a whole epoch): 4.62 after a time budget's partial
    last epoch, measured against the epochs before it (which may drop a last short batch), or for a run of
    one epoch against ``train_images`` (the training split) less a batch; (epochs, 0, 0) when all are whole."""
    last = history[-1].train_images if history else 0
    whole = max((r.train_images or 0) for r in history[:-1]) if len(history) > 1 else 0
    if len(history) == 1 and train_images and last and last <= train_images - batch_size:
        whole = train_images
    if not (whole and last and last < whole):
        return float(len(history)), 0, 0
    return len(history) - 1 + last / whole, last, whole


@dataclass
class RunSummary:
    """summary.json: the run's outcome. ``weights`` names the checkpoint evaluation uses (best.pt, chosen
    on validation accuracy, or last.pt, the final weights, without a validation set)."""

    model: str
    dataset: str
    recipe: str
    final_acc: float  # the final weights' test accuracy
    train_seconds: float
    epochs_done: int
    epochs_planned: int
    params: int = 0
    flops_per_image: int = 0
    images_per_second: float = 0.0
    peak_memory_mb: float = float("nan")
    tta: int = 0
    precision: str = "float32"
    skipped_steps: int = 0  # float16 steps the gradient scaler skipped, over the run
    weights: str = "last.pt"
    chosen_epoch: Optional[int] = None
    chosen_val_acc: Optional[float] = None
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, data: Dict[str, Any], source: str = "summary.json") -> "RunSummary":
        version = check_version(data.get("format_version", 1), source)
        data = dict(data, format_version=FORMAT_VERSION)
        if version == 1:  # its best_acc was chosen on the test set: not carried over
            data.pop("best_acc", None)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        with _naming(source):
            missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in data]
            if missing:
                raise RunFileError(f"{source}: damaged (missing {', '.join(missing)})")
            for name in ("final_acc", "train_seconds"):
                float(data[name])
            return cls(**{k: v for k, v in data.items() if k in fields})


def write_config(run_dir: Path, info: RunInfo) -> None:
    write_text_atomic(Path(run_dir) / "config.json", json.dumps(info.to_dict(), indent=2, default=str) + "\n")


def write_summary(run_dir: Path, summary: RunSummary) -> None:
    write_text_atomic(Path(run_dir) / "summary.json", json.dumps(dataclasses.asdict(summary), indent=2) + "\n")


def write_metrics(path: Path, history: List[EpochRecord]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    writer.writerows(r.to_row() for r in history)
    write_text_atomic(path, text.getvalue())


def _read_text(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start]
        raise RunFileError(f"{path}: damaged (not UTF-8 text: byte {exc.start} is {bad:#04x})") from None


def read_metrics(path: Path) -> List[EpochRecord]:
    """metrics.csv as records (a version-1 file, without validation columns, migrates)."""
    try:
        rows = list(csv.DictReader(io.StringIO(_read_text(path), newline="")))
    except csv.Error as exc:
        raise RunFileError(f"{path}: damaged ({exc})") from None
    for row in rows[:1]:
        check_version(row.get("format_version") or 1, path)
    return [EpochRecord.from_row(row, str(path)) for row in rows]


def read_json_file(path: Path) -> Dict[str, Any]:
    """A run file's JSON object; anything else fails naming the file."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise RunFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RunFileError(f"{path}: expected a JSON object")
    return data


@dataclass
class Run:
    """A run directory as read by :func:`load_run`."""

    path: Path
    info: RunInfo
    history: List[EpochRecord]
    summary: Optional[RunSummary] = None

    @property
    def config(self) -> TrainConfig:
        return self.info.config

    @property
    def weights_path(self) -> Path:
        """The checkpoint to evaluate: best.pt (chosen on validation) where the run has one, else last.pt.
        A version-1 run's best.pt was chosen on the test set, so its final weights are used instead."""
        best = self.path / "best.pt"
        if best.is_file() and self.info.format_version >= 2:
            return best
        return self.path / "last.pt"

    @property
    def final_acc(self) -> Optional[float]:
        scored = [r for r in self.history if r.scored]
        return scored[-1].test_acc if scored else None

    def epochs_trained(self) -> Tuple[float, int, int]:
        """:func:`epochs_trained` of this run's history (4.62 after a time budget's partial last epoch)."""
        return epochs_trained(self.history, self.info.train_images, self.config.batch_size or 1)


def load_run(path: Union[str, Path]) -> Run:
    """Read a run directory's config.json, metrics.csv and (if the run finished) summary.json."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise RunFormatError(f"{path}: not a run directory (no config.json)")
    raw = read_json_file(path / "config.json")
    info = RunInfo.from_dict(raw, str(path / "config.json"))
    info.format_version = int(raw.get("format_version", 1))
    history = read_metrics(path / "metrics.csv") if (path / "metrics.csv").is_file() else []
    summary = None
    if (path / "summary.json").is_file():
        summary = RunSummary.from_dict(read_json_file(path / "summary.json"), str(path / "summary.json"))
    return Run(path, info, history, summary)


def _run_format_version(run_dir: Path) -> int:
    """config.json's format_version, read leniently: a damaged config.json does not stop evaluation, which
    needs only the checkpoint."""
    try:
        return int(json.loads((run_dir / "config.json").read_text(encoding="utf-8")).get("format_version", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return FORMAT_VERSION


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """A run directory -> the checkpoint evaluation uses (:attr:`Run.weights_path`: best.pt where validation
    chose one, else last.pt; a version-1 run's best.pt was chosen on test data); a file -> itself."""
    path = Path(path)
    if path.is_dir():
        best = path / "best.pt"
        weights = best if best.is_file() and _run_format_version(path) >= 2 else path / "last.pt"
        if not weights.is_file():
            raise CheckpointError(f"{path}: no checkpoint ({weights.name}) in this run directory")
        return weights
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    return path


def read_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """A checkpoint file or a run's chosen one, version-checked (version 1 reads as it is)."""
    path = resolve_checkpoint(path)
    state = load_checkpoint(path)
    check_version(state.get("format_version", 1), path)
    return state


def load_model_state(model: nn.Module, state: Dict[str, Any], source: str = "checkpoint",
                     weights: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Load ``weights`` (default ``state['model']``) into ``model``, or explain which architecture the
    checkpoint belongs to."""
    weights = state["model"] if weights is None else weights
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shape = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or unexpected or shape:
        details = []
        if shape:
            details.append("shape differs for " + ", ".join(
                f"{k} ({tuple(weights[k].shape)} vs {tuple(own[k].shape)})" for k in shape[:3]))
        if missing:
            details.append("missing " + ", ".join(missing[:3]))
        if unexpected:
            details.append("unexpected " + ", ".join(unexpected[:3]))
        raise CheckpointError(f"{source} was trained with model {state.get('model_name', 'an unknown model')!r} "
                              f"(num_classes={state.get('num_classes')}, in_chans={state.get('in_chans')}) and does "
                              f"not fit {getattr(model, 'model_name', type(model).__name__)!r}: {'; '.join(details)}")
    model.load_state_dict(weights)


def _evaluated_weights(state: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """The weights a checkpoint's run evaluated: the EMA average where the run kept one, else the model."""
    ema = state.get("ema")
    if not ema:
        return state["model"]
    prefix = "module."
    return {k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)}


def build_model(state: Dict[str, Any], source: str = "checkpoint") -> nn.Module:
    """The evaluated model of a checkpoint, in eval mode, carrying ``.classes`` and ``.preprocessing``."""
    from .models import create_model
    spec = ModelSpec.from_dict(state)
    model = create_model(spec.model_name, num_classes=spec.num_classes, in_chans=spec.in_chans, **spec.model_kwargs)
    load_model_state(model, state, source, _evaluated_weights(state))
    model.classes = list(spec.classes)
    model.preprocessing = {"image_size": spec.image_size, "mean": spec.mean, "std": spec.std}
    return model.eval()


def load_model(path: Union[str, Path], device: Union[str, torch.device] = "cpu") -> nn.Module:
    """A trained model from a run directory (best.pt where validation chose one, else the final weights
    in last.pt), a checkpoint file or a safetensors export, in eval mode, carrying ``.classes`` and
    ``.preprocessing``."""
    if str(path).endswith(".safetensors"):
        return _load_safetensors(Path(path)).to(device)
    ckpt = resolve_checkpoint(path)
    return build_model(read_checkpoint(ckpt), str(ckpt)).to(device)


def read_safetensors(path: Union[str, Path]) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(the state dict, the metadata) of a safetensors file; reading one runs no code, by its format."""
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError:
        raise UsageError(f"{path}: reading safetensors needs the safetensors package: pip install "
                         f"'moderncnn[export]'") from None
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
        weights = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except ValueError:
            meta[key] = value
    return weights, meta


def _load_safetensors(path: Path) -> nn.Module:
    """A model from moderncnn's safetensors export: built from the model spec in its metadata, weights loaded
    strictly."""
    weights, meta = read_safetensors(path)
    if "model_name" not in meta:
        raise CheckpointError(f"{path}: no moderncnn model spec in its metadata (a plain state dict: load it with "
                              f"create_model(NAME, pretrained={str(path)!r}))")
    return build_model({**meta, "model": weights}, str(path))


def run_name(model: str, dataset: str) -> str:
    """A new run directory's default name: time, model, dataset."""
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{model}-{dataset}"


def software_versions(device: Optional[torch.device] = None) -> Dict[str, str]:
    """Python, torch, torchvision and moderncnn versions, the platform and the device, for run records."""
    from ._version import __version__
    info = {"python": platform.python_version(), "torch": torch.__version__, "moderncnn": __version__,
            "platform": platform.platform(), "threads": str(torch.get_num_threads()), "cpus": str(os.cpu_count())}
    try:
        import torchvision
        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if device is not None:
        info["device"] = str(device)
        info["device_name"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                               else platform.processor() or platform.machine())
    return info


def peak_memory_mb(device: Union[str, torch.device] = "cpu") -> float:
    """Peak memory of this process: CUDA's max allocated on a GPU, else the peak resident set size."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource
    except ImportError:  # Windows
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 2 ** 10
