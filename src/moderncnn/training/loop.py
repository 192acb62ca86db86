"""The two things a run does over and over: train one epoch, and score a model on a split.

Both are plain functions of a :class:`~moderncnn.training.setup.TrainSetup` and a
:class:`~moderncnn.training.state.TrainState`; the fast path of a step is visible in :func:`train_one_epoch`.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Loader
from ..models.pretrained import keep_frozen_norms_in_eval
from ..runs import EpochRecord
from .distributed import DistInfo, all_reduce_sum
from .state import EpochTotals, TrainState

if TYPE_CHECKING:
    from .callback import CallbackList
    from .setup import TrainSetup

__all__ = ["TrainingInterrupted", "NonFiniteLossError", "StepOutput", "EpochTrained", "tta_views", "tta_logits",
           "evaluate", "train_one_epoch", "evaluate_epoch", "interrupted"]


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM: the run stopped after saving last.pt. ``exit_code`` is 130 or 143."""

    def __init__(self, message: str, exit_code: int, run_dir):
        super().__init__(message)
        self.exit_code = exit_code
        self.run_dir = run_dir


class NonFiniteLossError(RuntimeError):
    """The loss, the weights or the outputs became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class StepOutput:
    """What :meth:`Callback.on_step_end` receives: the step's place, its (undetached) loss, logits and labels,
    the learning rate it ran at, and the epoch's running totals and seconds so far."""

    epoch: int
    step: int
    global_step: int
    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    lr: float
    totals: EpochTotals
    seconds: float


@dataclass
class EpochTrained:
    totals: EpochTotals
    seconds: float
    last_step: int
    side: int


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


def tta_logits(model: nn.Module, x: torch.Tensor, level: int, below: float = 1.0) -> torch.Tensor:
    """Weighted mean of the model's logits over :func:`tta_views`. With ``below`` < 1, only the images whose
    plain prediction's top probability is under ``below`` get the other views (selective TTA, as in
    hiverge's CIFAR-10 speed run): the confident ones keep their plain logits, and the views cost in
    proportion to the doubt."""
    plain = model(x).float()
    every = below >= 1.0
    unsure = None if every else plain.softmax(1).amax(1) < below
    if level <= 0 or not (every or unsure.any()):
        return plain
    (weight, _), *others = tta_views(x if every else x[unsure], int(level))  # the first view is x itself
    total = (plain if every else plain[unsure]) * weight
    for weight, view in others:
        total = total + model(view).float() * weight
    return total if every else plain.index_put((unsure,), total)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Loader, tta: int = 0, amp_dtype=None,
             info: DistInfo = DistInfo(), return_predictions: bool = False, tta_below: float = 1.0):
    """Loss and accuracy of ``model`` on ``loader`` (summed across ranks); ``tta`` is the test-time
    augmentation level (0 off, 1 flip, 2 flip + one-pixel shifts, see :func:`tta_views`), given to the images
    whose plain top probability is under ``tta_below`` (1: every image; see :func:`tta_logits`).
    Returns (loss, acc) or (loss, acc, predictions, probabilities). Non-finite outputs raise
    :class:`NonFiniteLossError`: diverged weights must stop a run, not score it."""
    model.eval()
    device = loader.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct, count, bad = (torch.zeros((), dtype=torch.int64, device=device) for _ in range(3))
    preds, probs = [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = tta_logits(model, x, int(tta), tta_below)  # float32 whatever the autocast dtype
        bad += (~torch.isfinite(logits)).any()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        pred = logits.argmax(1)
        correct += (pred == y).sum()
        count += y.numel()
        if return_predictions:
            preds.append(pred.cpu())
            probs.append(logits.softmax(1).cpu())
    for t in (loss_sum, correct, count, bad):
        all_reduce_sum(t, info)
    if bad.item():
        raise NonFiniteLossError(f"the model's outputs on the {loader.dataset.split} set are not finite: "
                                 f"its weights have diverged")
    loss, acc = loss_sum.item() / max(1, count.item()), correct.item() / max(1, count.item())
    if return_predictions:
        return loss, acc, torch.cat(preds), torch.cat(probs)
    return loss, acc


def _interrupt(run: "TrainSetup", state: TrainState, callbacks: "CallbackList", signum: int,
               totals: EpochTotals, seconds: float) -> TrainingInterrupted:
    """Record where the epoch stopped (resume continues after this step), let the callbacks save it, and
    return the exception that ends the run."""
    state.partial = totals.to_dict(seconds)
    state.loader_rng = run.train_loader.generator.get_state()
    return interrupted(run, state, callbacks, signum, f"at epoch {state.epoch + 1}, step {state.step}")


def interrupted(run: "TrainSetup", state: TrainState, callbacks: "CallbackList", signum: int,
                where: str) -> TrainingInterrupted:
    """Let the callbacks save ``state`` and return the exception that ends the run (a signal that came
    during an evaluation stops the run at the epoch's end: ``where`` is "after epoch N")."""
    callbacks.on_interrupt(run, state, signum)
    name, code = ("SIGINT", 130) if signum == signal.SIGINT else ("SIGTERM", 143)
    return TrainingInterrupted(f"{name}: stopped {where}; saved {run.run_dir / 'last.pt'}.\n"
                               f"resume with: {run.resume_command()}", code, run.run_dir)


def train_one_epoch(run: "TrainSetup", state: TrainState, callbacks: "CallbackList", stop) -> EpochTrained:
    """Train ``state.epoch`` from ``state.step`` to the plan's end of it. ``stop.signum`` set by a signal
    ends the epoch after the current step with :class:`TrainingInterrupted`."""
    cfg, plan, epoch = run.cfg, run.plan, state.epoch
    run.net.train()
    keep_frozen_norms_in_eval(run.model)
    start, side, first_step = time.perf_counter(), plan.side(epoch), state.step
    totals = (EpochTotals.from_dict(state.partial, run.device) if state.partial and first_step
              else EpochTotals.zeros(run.device))
    batches = run.train_loader.iterate(epoch, first_step, state.loader_rng if first_step else None)
    state.partial = state.loader_rng = None
    plan.begin_epoch(first_step)
    spent_before, last_step = state.train_seconds, first_step - 1
    steps_per_epoch, full = plan.steps_per_epoch, run.spec.image_size
    for step, (x, y) in enumerate(batches, start=first_step):
        if step >= plan.steps_in(epoch):
            break
        if side != full:  # progressive resizing: the augmented batch, shrunk
            x = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        lr = run.optimizer.param_groups[0]["lr"]
        with run.precision.autocast(run.device.type):
            logits, loss = run.model.loss(run.net(x), y, run.criterion)
        skipped = run.backward.step(loss, run.optimizer, run.model.parameters(), cfg.grad_clip)
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update_parameters(run.model)
        state.step, last_step = step + 1, step
        plan.after_step(epoch, step, first_step, spent_before)
        totals.add(loss, logits, y, skipped)
        seconds = totals.seconds + time.perf_counter() - start
        callbacks.on_step_end(run, state, StepOutput(epoch, step, epoch * steps_per_epoch + step, loss, logits, y,
                                                     lr, totals, seconds))
        if stop.signum is not None:
            raise _interrupt(run, state, callbacks, stop.signum, totals, seconds)
    return EpochTrained(totals, totals.seconds + time.perf_counter() - start, last_step, side)


def _score(run: "TrainSetup", state: TrainState, last: bool) -> Tuple[Optional[tuple], tuple, int]:
    """(validation loss and accuracy or None, test loss and accuracy, the test's TTA level). The test set
    gets the run's TTA on the last epoch; validation is always scored plainly, so epochs compare alike."""
    val = None
    if run.val_loader is not None:
        val = evaluate(run.eval_model, run.val_loader, amp_dtype=run.amp_dtype, info=run.dist)
    tta, below = (int(run.cfg.tta or 0), run.cfg.tta_below) if last else (0, 1.0)
    if last and run.is_main and not run.dist.enabled:  # keep the predictions for the report
        loss, acc, *state.final_predictions = evaluate(run.eval_model, run.test_loader, tta=tta, tta_below=below,
                                                        amp_dtype=run.amp_dtype, return_predictions=True)
        return val, (loss, acc), tta
    return val, evaluate(run.eval_model, run.test_loader, tta=tta, tta_below=below, amp_dtype=run.amp_dtype,
                         info=run.dist), tta


def evaluate_epoch(run: "TrainSetup", state: TrainState, trained: EpochTrained) -> Tuple[EpochRecord, bool]:
    """The epoch's record after scoring validation and test sets where the plan says so, and whether it is
    the run's last (the plan's end, or a spent time budget)."""
    cfg, plan, epoch = run.cfg, run.plan, state.epoch
    totals = trained.totals
    totals.reduce(run.dist)
    seen = int(totals.seen.item())
    plan.end_epoch(epoch, trained.side, trained.seconds, seen, trained.last_step, state.train_seconds)
    # Should the plan have been too long, the epoch that passes the budget is the last (on every rank).
    spent = torch.tensor(int(bool(cfg.budget and state.train_seconds + trained.seconds >= cfg.budget)),
                         device=run.device)
    all_reduce_sum(spent, run.dist)
    last = epoch + 1 >= plan.epochs or spent.item() > 0
    eval_start = time.perf_counter()
    val, test, tta = (None, (None, None), 0)
    if last or plan.evaluates_after(epoch):
        try:
            val, test, tta = _score(run, state, last)
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"after epoch {epoch + 1}, {exc}; stopped. The learning rate "
                                     f"({run.optimizer.param_groups[0]['lr']:.4g}) is probably too high. "
                                     f"The last good checkpoint is kept in {run.run_dir}.") from None
        if not tta:
            plan.record_evaluation(time.perf_counter() - eval_start)
    record = EpochRecord(epoch=epoch + 1, train_loss=totals.loss_sum.item() / seen,
                         train_acc=totals.correct.item() / seen, lr=run.optimizer.param_groups[0]["lr"],
                         seconds=trained.seconds + time.perf_counter() - eval_start,
                         images_per_second=seen / max(trained.seconds, 1e-9), train_images=seen,
                         train_size=trained.side, tta=tta, skipped_steps=int(totals.skipped.item()),
                         val_loss=val[0] if val else None,
                         val_acc=val[1] if val else None, test_loss=test[0], test_acc=test[1])
    return record, last
