"""The training run from end to end: resolve the config, set up, then epochs of train and evaluate, with
callbacks doing everything else. One path for CPU, one GPU and torchrun/DDP."""
from __future__ import annotations

import dataclasses
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple, Union

from ..checkpoint import CheckpointError, load_checkpoint
from ..runs import EpochRecord, TrainConfig, check_version
from .callbacks import Callback, CallbackList, default_callbacks
from .config import DEFAULTS, resolve_config
from .distributed import cleanup_distributed
from .loop import evaluate_epoch, interrupted, train_one_epoch
from .setup import TrainSetup, build_setup
from .state import TrainState

__all__ = ["train", "fit", "RunResult"]


@dataclass
class RunResult:
    """What :func:`train` returns. ``final_acc`` is the final weights' test accuracy; ``val_acc`` and
    ``chosen_epoch`` the validation accuracy and epoch of best.pt, where the run had a validation set."""

    run_dir: Path
    config: TrainConfig
    history: List[EpochRecord] = field(default_factory=list)
    final_acc: float = 0.0
    val_acc: Optional[float] = None
    chosen_epoch: Optional[int] = None
    train_seconds: float = 0.0
    params: int = 0
    flops: int = 0


class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks after every step; a second one stops at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def fit(run: TrainSetup, state: TrainState, callbacks: Iterable[Callback] = ()) -> RunResult:
    """Train ``run`` from ``state`` to the end of its plan, calling ``callbacks`` on every event."""
    callbacks = CallbackList(callbacks)
    run.plan.start(state.epoch, state.history)
    callbacks.on_train_start(run, state)
    with _StopSignals() as stop:
        while not state.done and state.epoch < run.plan.epochs:
            trained = train_one_epoch(run, state, callbacks, stop)
            record, state.done = evaluate_epoch(run, state, trained)
            state.history.append(record)
            state.epoch, state.step = state.epoch + 1, 0
            state.select(record)
            callbacks.on_epoch_end(run, state, record)
            if stop.signum is not None and not state.done:  # the signal came during the evaluation
                raise interrupted(run, state, callbacks, stop.signum, f"after epoch {state.epoch}")
    callbacks.on_train_end(run, state)
    if run.dist.enabled:
        # The other ranks wait for rank 0's report before the process group is torn down: a gloo rank
        # that left while rank 0 was still writing was seen to abort, and torchrun then failed the job.
        import torch.distributed
        torch.distributed.barrier()
    scored = [r for r in state.history if r.scored]
    return RunResult(run.run_dir, run.cfg, state.history, scored[-1].test_acc if scored else 0.0,
                     state.best_val_acc, state.best_epoch, state.train_seconds, run.info.params,
                     run.info.flops_per_image)


def _resume_config(config: TrainConfig, explicit: Set[str]) -> Tuple[TrainConfig, Dict[str, Any]]:
    """The saved run's config (only its length and how it runs may change) and its last.pt."""
    run_dir = Path(config.resume)
    path = run_dir / "last.pt" if run_dir.is_dir() else run_dir
    run_dir = run_dir if run_dir.is_dir() else run_dir.parent
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: nothing to resume (no last.pt)")
    checkpoint = load_checkpoint(path)
    check_version(checkpoint.get("format_version", 1), path)
    saved = TrainConfig.from_dict(checkpoint["config"], str(path))
    changes = {k: getattr(config, k) for k in ("epochs", "progress", "quiet", "device", "budget", "tensorboard")
               if k in explicit or (k == "epochs" and config.epochs is not None)}
    cfg = dataclasses.replace(saved, resume=str(run_dir), **changes)
    # Options added after the checkpoint was written take their defaults (they did not exist then).
    return dataclasses.replace(cfg, **{k: v for k, v in DEFAULTS.items() if getattr(cfg, k) is None}), checkpoint


def _start_state(run: TrainSetup, checkpoint: Optional[Dict[str, Any]]) -> TrainState:
    if checkpoint is None:
        return TrainState(run.model, run.optimizer, run.scheduler, run.ema)
    state = TrainState.from_checkpoint(checkpoint, run.model, run.optimizer, run.scheduler, run.ema, run.device,
                                       source=str(run.run_dir / "last.pt"))
    if state.epoch >= run.cfg.epochs:
        raise ValueError(f"{run.run_dir} already finished {state.epoch} epochs; pass a larger --epochs to continue")
    return state


def train(config: Union[TrainConfig, Dict[str, Any], None] = None, explicit: Optional[set] = None,
          callbacks: Iterable[Callback] = (), **overrides) -> RunResult:
    """Train a model; the Python door to ``moderncnn train`` (the same fields as the CLI flags).

    ``moderncnn.train(model="resnet18", dataset="cifar10", epochs=5)`` or ``train(TrainConfig(...))``.
    ``explicit`` names fields set by the user that the recipe must not change; ``callbacks`` are
    :class:`~moderncnn.train.callbacks.Callback` objects called after the built-in ones. Returns a
    :class:`RunResult`; the run directory holds config.json, metrics.csv, the plots, report.md, last.pt
    and, with a validation set, best.pt.
    """
    if config is None:
        config = TrainConfig()
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    if overrides:
        TrainConfig.from_dict(overrides, "train()")  # names an unknown field and the closest valid one
        config = dataclasses.replace(config, **overrides)
    explicit = set(explicit or ()) | {k for k, v in overrides.items() if v is not None}
    checkpoint = None
    if config.resume:
        cfg, checkpoint = _resume_config(config, explicit)
    else:
        cfg = resolve_config(config, explicit)
    if cfg.tensorboard:
        from .tensorboard import require_tensorboard
        require_tensorboard()  # before anything is written
    try:
        run = build_setup(cfg, resuming=checkpoint is not None)
        state = _start_state(run, checkpoint)
        return fit(run, state, [*default_callbacks(run), *callbacks])
    finally:
        cleanup_distributed()
