"""The training run from end to end: resolve the config, set up, then epochs of train and evaluate, with
callbacks doing everything else. One path for CPU, one GPU and torchrun/DDP."""
from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

from ..runlock import lock_run_dir
from ..runs import EpochRecord, TrainConfig, UsageError
from .callback import Callback, CallbackList
from .callbacks import (SCALER_BACKOFF_STEPS, CheckpointSaver, ConsoleLog, MetricsLogger, NonFiniteGuard,
                        ProgressBar, ReportWriter)
from .distributed import cleanup_distributed
from .loop import TrainingInterrupted, evaluate_epoch, interrupted, train_one_epoch
from .resolve import ResolvedConfig, read_resume_point, resolve_config, resume_point
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


def default_callbacks(run: "TrainSetup") -> List[Callback]:
    """The built-in callbacks of a run, in the order they are called."""
    from .notebook import in_notebook
    tolerate = SCALER_BACKOFF_STEPS if run.backward.scaler is not None else 0
    callbacks: List[Callback] = [NonFiniteGuard(defer=run.device.type == "cuda", tolerate=tolerate)]
    if not run.is_main:
        return callbacks
    cfg, notebook = run.cfg, in_notebook()
    if cfg.progress and not cfg.quiet and (sys.stdout.isatty() or notebook):
        callbacks.append(ProgressBar())
    callbacks += [ConsoleLog(quiet=cfg.quiet), MetricsLogger(), CheckpointSaver(), ReportWriter()]
    if notebook and not cfg.quiet:
        from .notebook import LiveCurves
        callbacks.append(LiveCurves())
    if cfg.tensorboard:
        from .tensorboard import TensorBoardLogger
        callbacks.append(TensorBoardLogger())
    return callbacks


class _StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks after every step; a second one stops at once, with
    ``again(signum)``'s :class:`TrainingInterrupted` (where last.pt stands, how to resume)."""

    def __init__(self, again: Callable[[int], BaseException]):
        self.signum: Optional[int] = None
        self._again = again
        self._previous = {}

    def __enter__(self):
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise self._again(signum)
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _interrupted_again(run: TrainSetup, signum: int) -> TrainingInterrupted:
    name, code = ("SIGINT", 130) if signum == signal.SIGINT else ("SIGTERM", 143)
    if not run.saved:
        return TrainingInterrupted(f"{name} again: stopped at once, before any checkpoint was saved; start the run "
                                   f"again", code, run.run_dir)
    return TrainingInterrupted(f"{name} again: stopped at once; {run.run_dir / 'last.pt'} still holds {run.saved}.\n"
                               f"resume with: {run.resume_command()}", code, run.run_dir)


def fit(run: TrainSetup, state: TrainState, callbacks: Iterable[Callback] = ()) -> RunResult:
    """Train ``run`` from ``state`` to the end of its plan, calling ``callbacks`` on every event."""
    callbacks = CallbackList(callbacks)
    run.plan.start(state.epoch, state.history)
    callbacks.on_train_start(run, state)
    with _StopSignals(lambda signum: _interrupted_again(run, signum)) as stop:
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


def _start_state(run: TrainSetup, checkpoint: Optional[Dict[str, Any]]) -> TrainState:
    if checkpoint is None:
        return TrainState(run.model, run.optimizer, run.scheduler, run.ema, run.backward, run.precision.kind)
    state = TrainState.from_checkpoint(checkpoint, run.model, run.optimizer, run.scheduler, run.ema, run.device,
                                       source=str(run.run_dir / "last.pt"), backward=run.backward,
                                       precision=run.precision.kind)
    run.saved = f"epoch {state.epoch + 1}, step {state.step}" if state.step else f"the end of epoch {state.epoch}"
    return state


def _is_complete(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file() and (run_dir / "report.md").is_file()


def _finish(run: TrainSetup, state: TrainState, callbacks: Iterable[Callback]) -> RunResult:
    """A run whose training ended but whose summary.json or report.md was not written (killed in between):
    write them from last.pt."""
    state.done = True
    callbacks = CallbackList(callbacks)
    callbacks.on_train_start(run, state)  # config.json rewritten, the start line printed
    callbacks.on_train_end(run, state)
    scored = [r for r in state.history if r.scored]
    return RunResult(run.run_dir, run.cfg, state.history, scored[-1].test_acc if scored else 0.0,
                     state.best_val_acc, state.best_epoch, state.train_seconds, run.info.params,
                     run.info.flops_per_image)


def _run(resolved: ResolvedConfig, callbacks: Iterable[Callback]) -> RunResult:
    run = build_setup(resolved)
    checkpoint = resolved.checkpoint
    try:
        state = _start_state(run, checkpoint)
        every = [*default_callbacks(run), *callbacks]
        if checkpoint is not None and state.epoch >= run.cfg.epochs:
            if _is_complete(run.run_dir):
                raise UsageError(f"{run.run_dir} already finished {state.epoch} epochs; pass a larger --epochs to "
                                 f"continue")
            return _finish(run, state, every)
        if checkpoint is not None and run.is_main:
            (run.run_dir / "summary.json").unlink(missing_ok=True)  # no longer finished: rewritten at its end
        return fit(run, state, every)
    finally:
        if run.lock is not None:
            run.lock.release()


def train(config: Union[TrainConfig, Dict[str, Any], None] = None, explicit: Optional[set] = None,
          callbacks: Iterable[Callback] = (), **overrides) -> RunResult:
    """Train a model; the Python door to ``moderncnn train`` (the same fields as the CLI flags).

    ``moderncnn.train(model="resnet18", dataset="cifar10", epochs=5)`` or ``train(TrainConfig(...))``.
    ``explicit`` names fields set by the user that the recipe must not change; ``callbacks`` are
    :class:`~moderncnn.training.callbacks.Callback` objects called after the built-in ones. Returns a
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
    lock = None
    try:
        resume = None
        if config.resume:
            run_dir, _ = resume_point(config.resume)
            # One writer: the lock is taken before last.pt is read (rank 0 writes; torchrun sets RANK).
            lock = lock_run_dir(run_dir) if os.environ.get("RANK", "0") == "0" else None
            resume = read_resume_point(config.resume)
        resolved = resolve_config(config, explicit, resume)
        if resolved.config.tensorboard:
            from .tensorboard import require_tensorboard
            require_tensorboard()  # before anything is written
        return _run(resolved, callbacks)
    finally:
        if lock is not None:
            lock.release()
        cleanup_distributed()
