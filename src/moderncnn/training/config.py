"""Named recipes and how a :class:`~moderncnn.runs.TrainConfig` is merged with them (the rest of resolving a
config is :mod:`moderncnn.training.resolve`).

A field left ``None`` is filled from the recipe, then from :data:`DEFAULTS`; anything set explicitly
(a CLI flag or a field passed to :func:`moderncnn.train`) wins over the recipe.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from ..runs import RunInfo, TrainConfig, UsageError, normalize_amp

__all__ = ["TrainConfig", "Recipe", "RECIPES", "D2L_SETTINGS", "DEFAULTS", "BUDGET_MAX_EPOCHS", "merge_recipe", "validate", "recipe_names",
           "train_side", "evaluates_after", "load_config_file", "INITS"]


DEFAULTS: Dict[str, Any] = dict(
    model="densenet_bc_fmnist", epochs=10, batch_size=128, lr=None, optimizer="sgd", momentum=0.9,
    schedule="onecycle", warmup=0.0, weight_decay=5e-4, label_smoothing=0.1, ema=0.0, grad_clip=0.0,
    augment="crop+flip", normalize=True, init=None, tta=False, tta_below=1.0, progressive_size=0,
    progressive_fraction=0.7, eval_every=1, channels_last=False, muon_normalize=False, first_conv_bias_epochs=0.0,
)

# The most epochs a run with a time budget plans when --epochs is not given (a bound for the planner's
# search, not a target; see budget.py).
BUDGET_MAX_EPOCHS = 10_000

# Default learning rates per optimizer, for a batch of 128 (scaled linearly with batch size when the
# learning rate is not given).
BASE_LR = {"sgd": 0.1, "adamw": 2e-3, "adam": 1e-3, "muon": 0.1}
OPTIMIZERS = tuple(BASE_LR)  # what --optimizer takes
SCHEDULES = ("cosine", "onecycle", "linear", "step", "constant")  # what --schedule takes
# The conv filters' default peak rate under Muon. CIFAR-10 probes (3 epochs, README): 0.02 < 0.05 = 0.1.
MUON_LR = 0.05

@dataclass(frozen=True)
class Recipe:
    """A named set of training options: ``purpose`` in one line, ``settings`` as TrainConfig fields, and
    ``model_options`` that apply only when the run trains the recipe's own model (rates tied to its output scale,
    its whitening layer). What each reaches, and what was tried, is in docs/results.md."""

    purpose: str
    settings: Mapping[str, Any]
    model_options: Mapping[str, Any] = field(default_factory=dict)


RECIPES: Dict[str, Recipe] = {
    "fast": Recipe("the default run: a small DenseNet-BC on Fashion-MNIST in a few minutes of a 2-core CPU", dict(
        model="densenet_bc_fmnist", epochs=4, batch_size=128, optimizer="sgd", lr=0.2, schedule="onecycle",
        weight_decay=5e-4, label_smoothing=0.1, augment="flip", channels_last=True)),
    "d2l": Recipe("Dive into Deep Learning, chapter 7, as the book trains (its rates, batches and sizes per model; "
                  "float32)", dict(
        epochs=10, optimizer="sgd", momentum=0.0, schedule="constant", warmup=0.0, weight_decay=0.0,
        label_smoothing=0.0, ema=0.0, grad_clip=0.0, augment="none", normalize=False, init="xavier", tta=False,
        amp="off")),
    "mnist": Recipe("DenseNet on MNIST, Adam as tutorial 2 trains it (float32: not measured in bfloat16 yet)", dict(
        dataset="mnist", model="densenet_bc_fmnist", epochs=5, batch_size=128, optimizer="adamw", lr=3e-3,
        schedule="onecycle", weight_decay=5e-4, label_smoothing=0.0, augment="crop", amp="off")),
    "cifar10": Recipe("DenseNet-BC on CIFAR-10 in an hour of a 2-core CPU", dict(
        dataset="cifar10", model="densenet_bc_cifar", epochs=33, batch_size=128, optimizer="muon", muon_lr=0.05,
        lr=0.2, schedule="onecycle", weight_decay=5e-4, label_smoothing=0.1, augment="crop+altflip", tta=2,
        channels_last=True, ema=0.0, progressive_size=24, progressive_fraction=0.7, eval_every=5, amp="auto")),
    "fmnist-best": Recipe("the best Fashion-MNIST DenseNet-BC in an hour of a 2-core CPU (float32: not measured "
                          "in bfloat16 yet)", dict(
        model="densenet_bc_fmnist", model_kwargs=dict(bn_size=4, stem_stride=1, stem_pool=True), epochs=33,
        batch_size=128, optimizer="muon", muon_lr=0.05, lr=0.2, schedule="onecycle", weight_decay=5e-4,
        label_smoothing=0.1, augment="crop+flip+erase", tta=2, ema=0.0, channels_last=True, amp="off")),
    # airbench sums its loss over the batch: the rates are its head 0.67 and bias 0.053 times the batch of 1000,
    # and its decay of 2e-6 per image and step on the head comes to 2e-6 / 0.67.
    "cifar10-speedrun": Recipe("airbench94_muon's method (Jordan, arXiv 2404.00498) on vgg_airbench: CIFAR-10 "
                               "at speed", dict(
        dataset="cifar10", model="vgg_airbench", epochs=8, batch_size=1000, optimizer="muon", muon_lr=0.24,
        momentum=0.85, schedule="linear", warmup=0.0, label_smoothing=0.2, augment="crop2+altflip", tta=2,
        tta_below=0.7, ema=0.0, channels_last=True, amp="auto", eval_every=0, progressive_size=24,
        progressive_fraction=0.5),
        model_options=dict(lr=670.0, bias_lr=53.0, weight_decay=3e-6, muon_momentum=0.6, muon_normalize=True,
                           init="whiten", first_conv_bias_epochs=3)),
    "cifar10-gpu": Recipe("DenseNet-BC (L=100, k=12) on CIFAR-10 in minutes of one GPU", dict(
        dataset="cifar10", model="densenet_bc_100", epochs=25, batch_size=512, optimizer="muon", muon_lr=0.05,
        lr=0.4, schedule="onecycle", weight_decay=5e-4, label_smoothing=0.1, augment="crop+flip", tta=2,
        amp="auto", channels_last=True)),
    "fmnist-best-gpu": Recipe("DenseNet-BC (L=100, k=12) on Fashion-MNIST in minutes of one GPU", dict(
        model="densenet_bc_100", epochs=12, batch_size=512, optimizer="sgd", lr=0.4, schedule="onecycle",
        weight_decay=5e-4, label_smoothing=0.1, augment="crop+flip+erase", tta=2, ema=0.0, amp="auto",
        channels_last=True)),
}

# d2l chapter 7: (learning rate, batch size, resize) per model.
D2L_SETTINGS: Dict[str, Dict[str, Any]] = {
    "alexnet_d2l": dict(lr=0.01, batch_size=128, image_size=224),
    "vgg_d2l": dict(lr=0.05, batch_size=128, image_size=224),
    "nin": dict(lr=0.1, batch_size=128, image_size=224),
    "googlenet_d2l": dict(lr=0.1, batch_size=128, image_size=96),
    "resnet_d2l": dict(lr=0.05, batch_size=256, image_size=96),
    "densenet_d2l": dict(lr=0.1, batch_size=256, image_size=96),
}


def model_arguments_for(model: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The constructor arguments of ``model`` among ``kwargs``: ``"resnet18:small_input"`` is
    ``small_input`` for resnet18 only (one ``--model-arg`` list for the many models of a comparison)."""
    out = {}
    for key, value in kwargs.items():
        scope, sep, name = key.rpartition(":")
        if not sep:
            out.setdefault(key, value)
        elif scope == model:
            out[name] = value  # a scoped argument wins over an unscoped one
    return out


def recipe_names():
    return sorted(RECIPES)


def _load_recipe(name: str) -> Dict[str, Any]:
    if name in RECIPES:
        recipe = RECIPES[name]
        return {**recipe.settings, "model_options": dict(recipe.model_options)} if recipe.model_options else \
            dict(recipe.settings)
    path = Path(name)
    if not path.is_file():
        path = Path("recipes") / f"{name}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise UsageError(f"{path}: a recipe file holds one JSON object of training options")
        TrainConfig.from_dict(data, f"recipe {path}")  # names an unknown field and the closest valid one
        return data
    raise UsageError(f"unknown recipe {name!r}; choose one of {', '.join(recipe_names())} or give a JSON file")


def merge_recipe(config: TrainConfig, explicit: Optional[set] = None) -> TrainConfig:
    """Fill unset fields from the recipe and the defaults, and validate. ``explicit`` names fields set by the
    user even where they equal a dataclass default (the CLI passes the flags it saw). The first step of
    :func:`~moderncnn.training.resolve.resolve_config`."""
    cfg = dataclasses.replace(config)
    recipe = _load_recipe(cfg.recipe)
    explicit = set(explicit or ())
    if cfg.pretrained and cfg.augment is None and "augment" not in explicit:
        cfg.augment = "rrc+flip"  # the ImageNet recipes' augmentation, for fine-tuning their weights
    defaults = TrainConfig()
    recipe_model_kwargs = recipe.pop("model_kwargs", {})
    # Options tuned for the recipe's own model (rates tied to its output scale, its whitening layer): they
    # apply when the run trains that model, as the recipe's model_kwargs do.
    model_options = recipe.pop("model_options", {})
    if model_options and (cfg.model or recipe.get("model")) == recipe.get("model"):
        recipe.update(model_options)
    for key, value in recipe.items():
        if key not in {f.name for f in dataclasses.fields(TrainConfig)}:
            raise UsageError(f"recipe {cfg.recipe!r}: unknown option {key!r}")
        current = getattr(cfg, key)
        user_set = key in explicit or (current is not None and current != getattr(defaults, key))
        if not user_set:
            setattr(cfg, key, value)
    if cfg.model is None:
        cfg.model = DEFAULTS["model"]
    # A recipe's model arguments belong to the recipe's model: they are dropped when the user trains
    # another model with the recipe, and the user's own --model-arg values win over them.
    if recipe_model_kwargs and cfg.model == recipe.get("model"):
        cfg.model_kwargs = {**recipe_model_kwargs, **cfg.model_kwargs}
    cfg.model_kwargs = model_arguments_for(cfg.model, cfg.model_kwargs)
    if cfg.recipe == "d2l":
        per_model = D2L_SETTINGS.get(cfg.model, dict(lr=0.1, batch_size=256, image_size=96))
        for key, value in per_model.items():
            if getattr(cfg, key) is None and key not in explicit:
                setattr(cfg, key, value)
    for key, value in DEFAULTS.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if cfg.lr is None:
        cfg.lr = BASE_LR.get(cfg.optimizer, 0.1) * cfg.batch_size / 128
    if cfg.optimizer == "muon" and cfg.muon_lr is None:
        cfg.muon_lr = MUON_LR
    if cfg.budget and config.epochs is None and "epochs" not in explicit:
        # A time budget decides the length (the recipe's epochs are for runs without one); --epochs,
        # given with it, is the most it may plan.
        cfg.epochs = BUDGET_MAX_EPOCHS
    validate(cfg)
    return cfg


INITS = ("xavier", "whiten")  # what --init takes
FP32_PRECISIONS = ("highest", "high", "medium")  # what --fp32-precision takes

# field -> (lowest, highest, whether each bound is allowed): numbers outside are refused before anything runs.
_RANGES = {"lr": (0, math.inf, False, False), "muon_lr": (0, math.inf, False, False),
           "bias_lr": (0, math.inf, False, False), "muon_momentum": (0, 1, True, False),
           "first_conv_bias_epochs": (0, math.inf, True, False),
           "momentum": (0, 1, True, False), "warmup": (0, math.inf, True, False),
           "weight_decay": (0, math.inf, True, False), "label_smoothing": (0, 1, True, False),
           "ema": (0, 1, True, False), "grad_clip": (0, math.inf, True, False),
           "head_lr_mult": (0, math.inf, False, False), "progressive_fraction": (0, 1, False, True),
           "tta_below": (0, 1, False, True),
           "budget": (0, math.inf, False, False), "val_split": (0, math.inf, False, False),
           "val_fraction": (0, 1, False, False)}


def _check_ranges(cfg: TrainConfig) -> None:
    for name, (low, high, low_ok, high_ok) in _RANGES.items():
        value = getattr(cfg, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UsageError(f"{name} must be a finite number, got {value!r}")
        if not ((low <= value if low_ok else low < value) and (value <= high if high_ok else value < high)):
            bounds = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
            raise UsageError(f"{name} must be in {bounds}, got {value:g}")
    for name in ("epochs", "batch_size", "image_size", "subset"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise UsageError(f"{name} must be a positive whole number, got {value!r}")
    if cfg.val_split is not None and cfg.val_split >= 1 and int(cfg.val_split) != cfg.val_split:
        raise UsageError(f"val_split must be a count of images or a fraction below 1, got {cfg.val_split:g}")


def validate(cfg: TrainConfig) -> None:
    """Refuse, in one line, a complete config whose values no run can take."""
    _check_ranges(cfg)
    if cfg.optimizer not in OPTIMIZERS:
        raise UsageError(f"optimizer must be {', '.join(OPTIMIZERS[:-1])} or {OPTIMIZERS[-1]}, "
                         f"got {cfg.optimizer!r}")
    if cfg.schedule not in SCHEDULES:
        raise UsageError(f"schedule must be {', '.join(SCHEDULES[:-1])} or {SCHEDULES[-1]}, got {cfg.schedule!r}")
    if cfg.device not in ("auto", "cpu", "cuda", "mps") and not str(cfg.device).startswith("cuda:"):
        raise UsageError(f"device must be auto, cpu, cuda or mps, got {cfg.device!r}")
    if int(cfg.tta or 0) not in (0, 1, 2):
        raise UsageError(f"tta must be 0 (off), 1 (flip) or 2 (flip + one-pixel shifts), got {cfg.tta!r}")
    if cfg.progressive_size < 0:
        raise UsageError(f"progressive_size must be >= 0, got {cfg.progressive_size}")
    if cfg.eval_every < 0:
        raise UsageError(f"eval_every must be >= 0 (0: evaluate after the last epoch only), got {cfg.eval_every}")
    cfg.amp = normalize_amp(cfg.amp)
    if cfg.fp32_precision not in FP32_PRECISIONS:
        raise UsageError(f"fp32_precision must be one of {', '.join(FP32_PRECISIONS)}, got {cfg.fp32_precision!r}")
    if cfg.init not in (None, *INITS):
        raise UsageError(f"init must be xavier or whiten, got {cfg.init!r}")
    if cfg.rrc_scale is not None:
        rrc_scale(cfg.rrc_scale)


def rrc_scale(text) -> Tuple[float, float]:
    """"0.35,1" -> (0.35, 1.0): the share of the image's area a random-resized crop covers."""
    try:
        low, high = (float(v) for v in str(text).replace(" ", "").split(","))
    except ValueError:
        raise UsageError(f"rrc_scale must be LOW,HIGH (e.g. 0.35,1), got {text!r}") from None
    if not 0 < low <= high <= 1:
        raise UsageError(f"rrc_scale must have 0 < LOW <= HIGH <= 1, got {text!r}")
    return low, high


# Fields of a replayed run that describe where and how that run ran, not what it trained.
_NOT_REPLAYED = ("resume", "name", "out", "progress", "quiet")


def load_config_file(path) -> Dict[str, Any]:
    """Training options from ``path``: a run's own config.json (its resolved config) or a recipe JSON (a
    flat object of options). Unknown fields fail naming the closest valid one."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"--config {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a JSON object of training options")
    if isinstance(data.get("config"), dict):  # a run's config.json
        config = RunInfo.from_dict(data, str(path)).config
        values = {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)}
        return {k: v for k, v in values.items() if k not in _NOT_REPLAYED}
    TrainConfig.from_dict(data, f"--config {path}")  # names an unknown field
    return data


def evaluates_after(epoch: int, epochs: int, eval_every: int) -> bool:
    """Whether the test set is scored after epoch ``epoch`` (0-based) of ``epochs``: every ``eval_every``-th
    epoch and always the last (``eval_every`` 0: the last only)."""
    return epoch + 1 >= epochs or (eval_every > 0 and (epoch + 1) % eval_every == 0)


def train_side(epoch: int, epochs: int, full: int, start: int, fraction: float) -> int:
    """The side at which epoch ``epoch`` (0-based) of ``epochs`` trains under progressive resizing.

    The side grows linearly from ``start`` to ``full`` over the first ``fraction`` of the epochs, in steps
    of 4 pixels, and is ``full`` for the rest (fast.ai's DAWNBench runs, FFCV's ImageNet recipes): small
    early epochs cost less, and the last ones train at the size the test images have. ``start`` 0 (or
    not below ``full``) turns it off.
    """
    ramp = int(round(fraction * epochs))
    if not start or start >= full or epoch >= ramp:
        return full
    grown = (full - start) * epoch / ramp
    return start + int(grown // 4) * 4  # below full: epoch < ramp
