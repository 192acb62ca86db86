"""Time-budgeted training: ``--budget 10m`` plans the number of epochs from measured epoch times, so that
the learning-rate schedule (and progressive resizing) ends when the time does.

Stopping a run planned for more epochs leaves it at a high learning rate, short of the end of its
schedule; a schedule that is planned to decay by the end of the budget is the better use of the same
time (Li, Yumer & Ramanan, "Budgeted Training: Rethinking Deep Neural Network Training Under Resource
Constraints", ICLR 2020). The plan is remade after a few steps of the first epoch and after every epoch,
from the seconds per training image at each side trained so far and the seconds of one evaluation.

The plan is counted in steps, not whole epochs, so the last epoch may see only part of the (shuffled)
training set: whole epochs would leave most of a budget's last epoch unused.

One-time costs are kept out of the prices: on a GPU the first steps at a new image size and the first
evaluation carry cuDNN's kernel search and the allocator's growth, and priced at those a budget is planned
short (docs/results.md has the measurements).
"""
from __future__ import annotations

import functools
import re
import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..runs import EpochRecord, TrainConfig
from .config import evaluates_after, train_side
from .optim import LRSchedule

__all__ = ["parse_budget", "EpochPlanner", "TrainingPlan", "TTA_VIEWS"]

# Forward passes per test image at each TTA level (see loop.tta_views).
TTA_VIEWS = {0: 1, 1: 2, 2: 6}


def parse_budget(text) -> Optional[float]:
    """'90s', '10m', '1.5h' or a number of seconds -> seconds (None for None or '')."""
    if text is None or text == "":
        return None
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
        if not match:
            raise ValueError(f"budget must look like 90s, 10m or 1.5h, got {text!r}")
        seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"budget must be positive, got {text!r}")
    return seconds


class EpochPlanner:
    """How many epochs fit in ``budget`` seconds of training and evaluation.

    Args:
        budget: seconds for all epochs together (training and the per-epoch evaluation, as the run's
            "seconds" column counts them).
        max_epochs: the most epochs to plan.
        full_side, progressive_size, progressive_fraction: the run's progressive resizing (see
            :func:`train_side`), so that small early epochs are planned at their own cost.
        train_images, test_images: images per epoch of training and per evaluation.
        final_views: forward passes per test image in the last evaluation (test-time augmentation).
        steps_per_epoch: the unit of a plan: :meth:`plan` counts steps (1: whole epochs).
        eval_every: the run's evaluation interval (see :func:`evaluates_after`): only the epochs that score
            the test set are priced an evaluation.
    """

    def __init__(self, budget: float, max_epochs: int, full_side: int, progressive_size: int = 0,
                 progressive_fraction: float = 0.7, train_images: int = 1, test_images: int = 0,
                 final_views: int = 1, steps_per_epoch: int = 1, eval_every: int = 1):
        self.budget, self.max_epochs = float(budget), int(max_epochs)
        self.steps_per_epoch = int(steps_per_epoch)
        self.eval_every = int(eval_every)
        self.full_side, self.progressive_size, self.progressive_fraction = full_side, progressive_size, \
            progressive_fraction
        self.train_images, self.test_images, self.final_views = train_images, test_images, final_views
        self.train_rate: Dict[int, float] = {}  # side -> seconds per training image (see record_train)
        self._recent_rates: Dict[int, List[float]] = {}
        self.eval_seconds: Optional[float] = None
        self.eval_warm = False  # False while the only evaluation timed is the run's first

    @property
    def measured(self) -> bool:
        return bool(self.train_rate)

    def record_train(self, side: int, seconds: float, images: int, provisional: bool = False) -> None:
        """One epoch's training time at ``side``. The price of an epoch there is the median of the last three
        measured: on a shared machine single epochs run slower than their neighbours, and priced at such an
        epoch a plan in its second half shrinks for good, while a lasting slowdown still moves the median within
        two epochs. A ``provisional``
        price (a few steps of an unmeasured run) stands until the side's first measured epoch replaces it."""
        if provisional:
            if images > 0 and seconds > 0 and not self._recent_rates.get(int(side)):
                self.train_rate[int(side)] = seconds / images
        elif images > 0 and seconds > 0:
            recent = self._recent_rates.setdefault(int(side), [])
            recent[:] = (recent + [seconds / images])[-3:]
            self.train_rate[int(side)] = statistics.median(recent)

    def record_eval(self, seconds: float, warm: bool = True) -> None:
        """The seconds of one plain evaluation; ``warm=False`` for the process's first, which may carry
        one-time costs and is then trusted only up to the estimate from the training rate."""
        if seconds > 0 and (warm or not self.eval_warm):
            self.eval_seconds, self.eval_warm = seconds, warm

    def record_history(self, history) -> None:
        """The times of finished epochs (a run's :class:`~moderncnn.runs.EpochRecord` list)."""
        for i, row in enumerate(history):
            if row.train_images and row.images_per_second:
                train_time = row.train_images / row.images_per_second
                self.record_train(int(row.train_size or self.full_side), train_time, int(row.train_images))
                # A TTA evaluation costs several plain ones; an epoch without one has no test figures.
                if not row.tta and row.scored:
                    self.record_eval(row.seconds - train_time, warm=i > 0)

    def side(self, epoch: int, epochs: int) -> int:
        return train_side(epoch, epochs, self.full_side, self.progressive_size, self.progressive_fraction)

    def epoch_train_seconds(self, side: int) -> float:
        """One training epoch at ``side``: measured there, else scaled by area from the nearest measured side
        (convolutions cost in proportion to the pixels)."""
        nearest = min(self.train_rate, key=lambda s: (abs(s - side), -s))
        return self.train_rate[nearest] * (side / nearest) ** 2 * self.train_images

    def evaluation_seconds(self) -> float:
        if self.eval_seconds is not None and self.eval_warm:
            return self.eval_seconds
        # Not measured warm yet: a forward pass costs about a third of a training step (forward + backward).
        estimate = self.epoch_train_seconds(self.full_side) / 3 * self.test_images / max(1, self.train_images)
        return estimate if self.eval_seconds is None else min(self.eval_seconds, estimate)

    def epochs(self, steps: int) -> int:
        """Epochs a plan of ``steps`` steps takes (its last one may be partial)."""
        return -(-int(steps) // self.steps_per_epoch)

    def predicted_seconds(self, steps: int, done: int, spent: float) -> float:
        """Seconds at the end of a run of ``steps`` steps, ``done`` of which (and the evaluations of the epochs
        they complete) cost ``spent``; an epoch under way is priced for its remaining steps and evaluation."""
        per_eval, per_epoch = self.evaluation_seconds(), self.steps_per_epoch
        epochs = self.epochs(steps)
        total = spent
        for j in range(done // per_epoch, epochs):
            remaining = min(per_epoch, steps - j * per_epoch) - max(0, done - j * per_epoch)
            total += (self.epoch_train_seconds(self.side(j, epochs)) * remaining / per_epoch
                      + per_eval * evaluates_after(j, epochs, self.eval_every))
        return total + per_eval * (self.final_views - 1)

    def fit(self, committed: int, spent: float, limit: float) -> int:
        """The most steps (at least ``committed`` whole epochs, at most ``max_epochs``) predicted to end by
        ``limit``."""
        return self._fit(committed * self.steps_per_epoch, spent, limit)

    def _fit(self, done: int, spent: float, limit: float, least: Optional[int] = None) -> int:
        lo, hi = max(done, least or 0), self.max_epochs * self.steps_per_epoch
        if self.predicted_seconds(lo, done, spent) > limit:
            return lo
        if self.predicted_seconds(hi, done, spent) <= limit:  # predicted(lo) fits; find the last that does
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.predicted_seconds(mid, done, spent) <= limit:
                lo = mid
            else:
                hi = mid
        return lo

    def plan(self, committed: int, spent: float, current: Optional[int] = None) -> int:
        """The number of steps to run, ``committed`` epochs of which are done or under way and cost ``spent``;
        ``current`` is the plan so far (in steps).

        In the first half of the ``current`` plan it follows the times: the most steps that fit. In the
        second half the schedule is decaying, and a longer plan would raise the learning rate again (or
        stretch a schedule that has ended), so the plan only shrinks, and only when it is predicted to
        pass the budget by more than a quarter of an epoch (epoch times jitter).
        """
        return self._plan(committed * self.steps_per_epoch, spent, current)

    def plan_mid_epoch(self, done: int, spent: float, current: Optional[int] = None) -> int:
        """:meth:`plan` from inside an epoch: ``done`` steps (counted from the run's start) cost ``spent``.
        The plan may end before the epoch does (an epoch longer than the whole budget), but not before twice
        ``done`` steps, so that the schedule still has steps to decay in."""
        epoch_end = (done // self.steps_per_epoch + 1) * self.steps_per_epoch
        return self._plan(done, spent, current, least=min(epoch_end, 2 * done))

    def _plan(self, done: int, spent: float, current: Optional[int], least: Optional[int] = None) -> int:
        if not self.measured:
            return max(done, self.max_epochs * self.steps_per_epoch if current is None else current)
        if current is None or 2 * done < current:
            return self._fit(done, spent, self.budget, least)
        quarter_epoch = (self.epoch_train_seconds(self.full_side) + self.evaluation_seconds()) / 4
        if self.predicted_seconds(current, done, spent) > self.budget + quarter_epoch:
            return self._fit(done, spent, self.budget, least)
        return max(done, current)


class TrainingPlan:
    """How many steps a run takes, and the learning-rate schedule that ends with them.

    Without a time budget the plan is ``cfg.epochs`` whole epochs. With one, an :class:`EpochPlanner`
    prices the epochs from measured times and the plan is remade after the first ten timed steps and after
    every epoch; the schedule (and progressive resizing) follow it. ``agree`` turns one process's plan into
    the plan of every process (rank 0's under torchrun).
    """

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int, image_size: int, train_images: int,
                 eval_images: int, agree: Callable[[int], int] = int):
        self.cfg, self.steps_per_epoch, self.image_size = cfg, int(steps_per_epoch), int(image_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.lr_shape = LRSchedule(cfg.schedule, self.total_steps, int(round(cfg.warmup * self.steps_per_epoch)))
        self.planner: Optional[EpochPlanner] = None
        if cfg.budget:
            self.planner = EpochPlanner(cfg.budget, cfg.epochs, image_size, cfg.progressive_size,
                                        cfg.progressive_fraction, train_images=train_images,
                                        test_images=eval_images, final_views=TTA_VIEWS[int(cfg.tta or 0)],
                                        steps_per_epoch=steps_per_epoch, eval_every=cfg.eval_every)
        self._agree = agree
        self._evaluations_timed = 0
        self._warm_from = None  # (time, step) where this epoch's timing started
        self._early_steps: Tuple[int, ...] = ()
        self._epoch_start = time.perf_counter()

    def lr_factor(self, step: int) -> float:
        return self.lr_shape.factor(step, self.total_steps)

    def group_lr_factor(self, train_steps: int, step: int) -> float:
        """The factor of a parameter group that trains for its first ``train_steps`` steps only: the run's
        schedule shape squeezed into them, then zero."""
        return self.lr_shape.factor(step, train_steps) if step < train_steps else 0.0

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """A per-step scheduler whose length is this plan's, whatever it becomes; groups with ``train_steps``
        (:func:`~moderncnn.training.optim.param_groups`) follow :meth:`group_lr_factor`."""
        factors = [functools.partial(self.group_lr_factor, g["train_steps"]) if g.get("train_steps")
                   else self.lr_factor for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)

    @property
    def epochs(self) -> int:
        return -(-self.total_steps // self.steps_per_epoch)

    def steps_in(self, epoch: int) -> int:
        """Steps of ``epoch`` in the plan (below a whole epoch for a budget's partial last one)."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def side(self, epoch: int) -> int:
        cfg = self.cfg
        return train_side(epoch, self.epochs, self.image_size, cfg.progressive_size, cfg.progressive_fraction)

    def evaluates_after(self, epoch: int) -> bool:
        return evaluates_after(epoch, self.epochs, self.cfg.eval_every)

    def _evaluation_seconds_after(self, epoch: int) -> float:
        return self.planner.evaluation_seconds() if self.evaluates_after(epoch) else 0.0

    def _adopt(self, steps: int) -> None:
        self.total_steps = int(self._agree(steps))

    def start(self, start_epoch: int, history: List[EpochRecord]) -> None:
        """Plan a new or resumed run (a resumed one from the epochs it has done)."""
        if self.planner is not None:
            self.planner.record_history(history)
            self._adopt(self.planner.plan(start_epoch + 1, sum(r.seconds for r in history)))

    def begin_epoch(self, first_step: int) -> None:
        self._warm_from, self._early_steps = None, ()
        self._epoch_start = time.perf_counter()
        if self.planner is not None and not self.planner.measured:
            # An unmeasured run plans mid-epoch from its first timed step (an epoch longer than the budget
            # ends in time) and again from ten; too short an epoch plans at its end. The steps are fixed, not
            # timed, so that every process of a distributed run agrees on the plan at the same step.
            last = self.steps_per_epoch - 2
            self._early_steps = tuple(sorted({s for s in (first_step + 2, min(first_step + 11, last))
                                              if first_step + 1 < s <= last}))

    def after_step(self, epoch: int, step: int, first_step: int, spent_before: float) -> bool:
        """Time the epoch's steps; returns True where the plan changed. The clock starts after the first two
        steps: on a GPU the first steps at a new size search cuDNN's kernels, a one-time cost."""
        if self.planner is None:
            return False
        if step == first_step + 1:
            self._warm_from = (time.perf_counter(), step)
        if step not in self._early_steps:
            return False
        per_step = (time.perf_counter() - self._warm_from[0]) / (step - self._warm_from[1])
        side = self.side(epoch)
        self.planner.record_train(side, per_step * self.steps_per_epoch, self.planner.train_images, provisional=True)
        # Planned from the steps done, not the whole epoch: an epoch longer than the budget ends early.
        self._adopt(self.planner.plan_mid_epoch(epoch * self.steps_per_epoch + step + 1,
                                                spent_before + time.perf_counter() - self._epoch_start,
                                                self.total_steps))
        return True

    def end_epoch(self, epoch: int, side: int, train_time: float, seen: int, last_step: int,
                  spent_before: float) -> None:
        """Price the epoch just trained and plan again (its evaluation priced as the last one was)."""
        if self.planner is None:
            return
        warm = self._warm_from
        if warm is not None and last_step - warm[1] >= 2:
            per_step = (time.perf_counter() - warm[0]) / (last_step - warm[1])
            self.planner.record_train(side, per_step * self.steps_per_epoch, self.planner.train_images)
        else:
            self.planner.record_train(side, train_time, seen)
        spent = spent_before + train_time + self._evaluation_seconds_after(epoch)
        self._adopt(self.planner.plan(epoch + 1, spent, self.total_steps))

    def record_evaluation(self, seconds: float) -> None:
        """A plain (no TTA) evaluation's time; the process's first carries one-time costs."""
        if self.planner is not None:
            self.planner.record_eval(seconds, warm=self._evaluations_timed > 0)
            self._evaluations_timed += 1
