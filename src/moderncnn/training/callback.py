"""Callbacks: everything a run does besides training, as hooks on its events.

A callback overrides any of :class:`Callback`'s methods; each receives the run's
:class:`~moderncnn.training.setup.TrainSetup` (``run``: config, model, loaders, plan, run directory) and its
:class:`~moderncnn.training.state.TrainState` (``state``: epoch, step, history, selection). The console
output, the progress bar, metrics.csv, the checkpoints, the report and the non-finite-loss guard are
callbacks themselves (:mod:`moderncnn.training.callbacks`); ``moderncnn.train(..., callbacks=[...])`` adds yours
after them::

    class PrintLR(moderncnn.Callback):
        def on_epoch_end(self, run, state, record):
            print(f"epoch {record.epoch}: lr {record.lr:.4g}")

Under torchrun every process calls the callbacks.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, List

if TYPE_CHECKING:
    from ..runs import EpochRecord
    from .loop import StepOutput
    from .setup import TrainSetup
    from .state import TrainState

__all__ = ["Callback", "CallbackList"]


class Callback:
    """The events of a run, in order: ``on_train_start`` once (after the setup, before the first step),
    ``on_step_end`` after every optimizer step, ``on_epoch_end`` after each epoch's evaluation (its
    record is in ``state.history``; ``state.done`` is set on the last), ``on_train_end`` once at the end.
    ``on_interrupt`` runs instead of the rest of the epoch when Ctrl-C or SIGTERM stops the run."""

    def on_train_start(self, run: "TrainSetup", state: TrainState) -> None:
        pass

    def on_step_end(self, run: "TrainSetup", state: TrainState, step: StepOutput) -> None:
        pass

    def on_epoch_end(self, run: "TrainSetup", state: TrainState, record: EpochRecord) -> None:
        pass

    def on_train_end(self, run: "TrainSetup", state: TrainState) -> None:
        pass

    def on_interrupt(self, run: "TrainSetup", state: TrainState, signum: int) -> None:
        pass


class CallbackList(Callback):
    """Calls each callback in order."""

    def __init__(self, callbacks: Iterable[Callback]):
        self.callbacks: List[Callback] = list(callbacks)

    def on_train_start(self, run, state):
        for c in self.callbacks:
            c.on_train_start(run, state)

    def on_step_end(self, run, state, step):
        for c in self.callbacks:
            c.on_step_end(run, state, step)

    def on_epoch_end(self, run, state, record):
        for c in self.callbacks:
            c.on_epoch_end(run, state, record)

    def on_train_end(self, run, state):
        for c in self.callbacks:
            c.on_train_end(run, state)

    def on_interrupt(self, run, state, signum):
        for c in self.callbacks:
            c.on_interrupt(run, state, signum)
