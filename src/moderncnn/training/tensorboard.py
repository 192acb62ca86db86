"""TensorBoard event files for a run (``--tensorboard``): RUN/tensorboard/, written by rank 0.

Per epoch (at step = the epoch number): ``loss/train``, ``loss/val``, ``loss/test``, ``accuracy/train``,
``accuracy/val``, ``accuracy/test``, ``lr`` and ``throughput/images_per_s``; the training loss every
:attr:`TensorBoardLogger.every` steps as ``loss/train_step`` (at the global step); the config as text; the
confusion matrix and the prediction grid as images at the end. ``tensorboard --logdir runs`` shows them.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np

from .callback import Callback

if TYPE_CHECKING:
    from .setup import TrainSetup

__all__ = ["TensorBoardLogger", "require_tensorboard"]

INSTALL_HINT = "pip install 'moderncnn[tensorboard]'"


def require_tensorboard():
    """torch's SummaryWriter, or one line saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(f"--tensorboard needs the tensorboard package: {INSTALL_HINT}") from None
    return SummaryWriter


class TensorBoardLogger(Callback):
    """Writes a run's figures as TensorBoard events. A resumed run appends to the same files: epochs and
    steps already written are not written again."""

    def __init__(self, every: int = 20):
        self.every = every
        self.writer = None

    def on_train_start(self, run: "TrainSetup", state):
        SummaryWriter = require_tensorboard()
        step = state.epoch * run.plan.steps_per_epoch + state.step
        # A run that crashed after its last checkpoint wrote steps it will now train again: purge them. The
        # epoch scalars (small step numbers) are left alone unless the global step cannot be told from them.
        purge = step if state.epoch or state.step else None
        if purge is not None and purge <= run.plan.epochs:
            purge = None
        self.writer = SummaryWriter(log_dir=str(run.run_dir / "tensorboard"), purge_step=purge)
        if purge is None and not state.history:
            config = json.dumps(run.info.to_dict()["config"], indent=2, default=str)
            self.writer.add_text("config", f"```\n{config}\n```", 0)

    def on_step_end(self, run, state, step):
        if step.global_step % self.every == 0:
            self.writer.add_scalar("loss/train_step", step.loss.item(), step.global_step)

    def on_epoch_end(self, run, state, record):
        w, epoch = self.writer, record.epoch
        for split in ("train", "val", "test"):
            loss, acc = getattr(record, f"{split}_loss"), getattr(record, f"{split}_acc")
            if acc is not None:
                w.add_scalar(f"loss/{split}", loss, epoch)
                w.add_scalar(f"accuracy/{split}", acc, epoch)
        w.add_scalar("lr", record.lr, epoch)
        w.add_scalar("throughput/images_per_s", record.images_per_second, epoch)
        w.flush()

    def on_train_end(self, run, state):
        from PIL import Image
        for name in ("confusion", "predictions"):
            path = run.run_dir / f"{name}.png"
            if path.is_file():
                with Image.open(path) as img:
                    self.writer.add_image(name, np.asarray(img.convert("RGB")), len(state.history),
                                          dataformats="HWC")
        self.writer.close()

    def on_interrupt(self, run, state, signum):
        self.writer.close()
