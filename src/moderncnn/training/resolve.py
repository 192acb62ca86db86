"""Resolve once: a :class:`~moderncnn.runs.TrainConfig` as given -> one frozen :class:`ResolvedConfig`, the only
input :func:`~moderncnn.training.setup.build_setup` takes.

Everything a run decides before it builds anything is decided here, in this order: the recipe and the
defaults (:func:`~moderncnn.training.config.merge_recipe`), or for a resume the saved run's config with the
changes a resume may make; the input size of ImageNet weights; the augmentation, parsed; the device; the
precision. A resumed config is validated like any other.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, FrozenSet, Optional, Tuple

import torch

from ..checkpoint import load_checkpoint
from ..data.loader import Augment
from ..runs import TrainConfig, UsageError, check_version
from .config import DEFAULTS, merge_recipe, rrc_scale, validate
from .precision import Precision, resolve_precision

__all__ = ["ResolvedConfig", "ResumePoint", "resolve_config", "resume_point", "read_resume_point", "pick_device",
           "RESUME_CHANGEABLE"]

# What a resume may change: how long the run goes on, where, how it reports, and where its data lies (the
# data itself is checked by its fingerprint). Anything else trains a different run.
RESUME_CHANGEABLE = ("epochs", "budget", "device", "progress", "quiet", "tensorboard", "eval_every", "data_dir",
                     "download", "cache_dir", "decode_workers", "data_cache", "resume")


@dataclass(frozen=True)
class ResumePoint:
    """A run to continue: its directory, its last.pt, and what last.pt holds."""

    run_dir: Path
    path: Path
    checkpoint: Dict[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True)
class ResolvedConfig:
    """A run's every decision: ``config`` with no field left to a recipe (what config.json records), the user's
    ``explicit`` fields, the parsed ``augmentation`` (of ``config.augment``), the ``device``, the ``precision``,
    and for a resume the point it continues from. A TrainConfig field or method read on it is ``config``'s (``resolved.lr``)."""

    config: TrainConfig
    augmentation: Augment
    device: torch.device
    precision: Precision
    explicit: FrozenSet[str] = frozenset()
    resume: Optional[ResumePoint] = None

    def __getattr__(self, name: str) -> Any:
        if name in _FIELDS or (not name.startswith("_") and hasattr(TrainConfig, name)):  # its fields and methods
            return getattr(self.config, name)
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    @property
    def checkpoint(self) -> Optional[Dict[str, Any]]:
        return self.resume.checkpoint if self.resume else None


_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


def resolve_config(config: TrainConfig, explicit: Optional[set] = None,
                   resume: Optional[ResumePoint] = None) -> ResolvedConfig:
    """``config`` resolved: against its recipe for a new run, against ``resume``'s saved config for a resume
    (``resume`` read by :func:`read_resume_point` once the run is locked)."""
    explicit = frozenset(explicit or ())
    cfg = _resumed(config, explicit, resume) if resume is not None else merge_recipe(config, explicit)
    cfg = _with_pretrained_size(cfg)
    device = _device(cfg.device)
    saved = resume.checkpoint.get("precision") if resume is not None else None
    return ResolvedConfig(cfg, _augment(cfg), device, _precision(cfg, device, saved), explicit, resume)


def _augment(cfg: TrainConfig) -> Augment:
    augment = Augment.parse(cfg.augment)
    if augment.rrc and cfg.rrc_scale:
        augment = dataclasses.replace(augment, rrc_scale=rrc_scale(cfg.rrc_scale))
    return augment


def pick_device(name: str) -> torch.device:
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    if name == "mps" and not mps:
        raise UsageError("--device mps: MPS is not available here")
    return torch.device(name)


def _device(name: str) -> torch.device:
    device = pick_device(name)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: one GPU per process
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _precision(cfg: TrainConfig, device: torch.device, saved: Optional[str]) -> Precision:
    """``--amp`` on ``device``; a resume keeps the precision its checkpoint was trained under."""
    precision = resolve_precision(cfg.amp, device)
    if saved and saved != precision.kind and cfg.amp == "auto":
        # auto decided when the run started; a resume elsewhere keeps that decision, so it continues exactly
        kept = resolve_precision(saved, device)
        precision = dataclasses.replace(kept, reason=f"{kept.reason}; kept from the run's start (--amp auto)",
                                        requested="auto")
    if saved and saved != precision.kind:
        raise UsageError(f"{cfg.resume}: its checkpoint was trained under --amp {saved}, and this run would train "
                         f"under --amp {precision.kind} ({precision.description}); resume it with --amp {saved}, "
                         f"or start a new run")
    return precision


def _with_pretrained_size(cfg: TrainConfig) -> TrainConfig:
    """ImageNet weights without --image-size train at the resolution they were trained at."""
    if cfg.pretrained is True and not cfg.image_size:
        from ..models.pretrained import has_pretrained, preprocessing
        if has_pretrained(cfg.model):
            return dataclasses.replace(cfg, image_size=preprocessing(cfg.model)["crop"])
    return cfg


# --- resuming ---------------------------------------------------------------------------------------------
def resume_point(given: str) -> Tuple[Path, Path]:
    """(the run directory, its last.pt) for ``--resume PATH``, or a one-line error naming PATH."""
    path = Path(given)
    if not path.exists():
        raise UsageError(f"--resume {given}: no such run directory")
    run_dir, checkpoint = (path, path / "last.pt") if path.is_dir() else (path.parent, path)
    if not checkpoint.is_file():
        raise UsageError(f"--resume {given}: nothing to resume (no last.pt)")
    return run_dir, checkpoint


def read_resume_point(given: str) -> ResumePoint:
    """``--resume PATH``'s checkpoint, read (after the caller has locked the run): refused in one line where it
    cannot continue a run."""
    run_dir, path = resume_point(given)
    checkpoint = load_checkpoint(path)
    check_version(checkpoint.get("format_version", 1), path)
    if "optimizer" not in checkpoint:
        raise UsageError(f"--resume {given}: {path.name} holds chosen weights without the optimizer state; "
                         f"resume the run with --resume {run_dir} (its last.pt), or fine-tune from these weights in "
                         f"a new run with --pretrained {path}")
    return ResumePoint(run_dir, path, checkpoint)


def _shown(value: Any) -> str:
    return json.dumps(value, default=str) if isinstance(value, (dict, list, tuple)) else str(value)


def _comparable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))  # tuples and lists alike, as config.json holds them


def _resumed(config: TrainConfig, explicit: FrozenSet[str], resume: ResumePoint) -> TrainConfig:
    """The saved run's config with the changes a resume may make; any other change the user asked for is refused,
    each named as ``field: old -> new``."""
    saved = TrainConfig.from_dict(resume.checkpoint["config"], str(resume.path))
    changed = sorted(k for k in explicit if k not in RESUME_CHANGEABLE and hasattr(saved, k)
                     and _comparable(getattr(config, k)) != _comparable(getattr(saved, k)))
    if changed:
        differences = "; ".join(f"{k}: {_shown(getattr(saved, k))} -> {_shown(getattr(config, k))}" for k in changed)
        raise UsageError(f"--resume {config.resume}: a resume continues the run as it was, and these differ "
                         f"({differences}); start a new run for them, or fine-tune from this one with --pretrained "
                         f"{resume.run_dir / 'last.pt'}")
    changes = {k: getattr(config, k) for k in RESUME_CHANGEABLE
               if k in explicit or (k == "epochs" and config.epochs is not None)}
    cfg = dataclasses.replace(saved, **{**changes, "resume": str(resume.run_dir)})
    # Options added after the checkpoint was written take their defaults (they did not exist then).
    cfg = dataclasses.replace(cfg, **{k: v for k, v in DEFAULTS.items() if getattr(cfg, k) is None})
    validate(cfg)
    return cfg
