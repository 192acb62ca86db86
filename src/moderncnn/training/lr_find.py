"""The learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks", 2017; fastai's
``lr_find``): train from the initial weights while the learning rate grows exponentially, record the
smoothed loss, stop when it diverges, and suggest a peak learning rate for data not tuned on."""
from __future__ import annotations

import csv
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from matplotlib.figure import Figure

from ..runs import TrainConfig, UsageError
from .distributed import cleanup_distributed
from .resolve import resolve_config
from .setup import TrainSetup, build_setup

__all__ = ["lr_find", "LRFindResult"]


@dataclass
class LRFindResult:
    """The sweep: learning rates, raw and smoothed losses; ``suggestion`` is the rate a tenth below the
    smoothed loss's minimum (``min_loss_lr``), where the loss still falls fast; ``steepest`` the rate
    where it falls fastest."""

    run_dir: Path
    lrs: List[float] = field(default_factory=list)
    losses: List[float] = field(default_factory=list)
    smoothed: List[float] = field(default_factory=list)
    min_loss_lr: float = math.nan
    steepest: float = math.nan
    suggestion: float = math.nan


def _sweep(run: TrainSetup, steps: int, start_lr: float, end_lr: float, beta: float = 0.98) -> LRFindResult:
    result = LRFindResult(run.run_dir)
    base = list(run.scheduler.base_lrs)  # each group's peak rate (head multipliers, Muon's filters)
    run.net.train()
    average, best, step, epoch = 0.0, math.inf, 0, 0
    while step < steps:
        for x, y in run.train_loader.iterate(epoch):
            lr = start_lr * (end_lr / start_lr) ** (step / max(1, steps - 1))
            for group, peak in zip(run.optimizer.param_groups, base):
                group["lr"] = peak * lr / run.cfg.lr
            with run.precision.autocast(run.device.type):
                _, loss = run.model.loss(run.net(x), y, run.criterion)
            run.backward.step(loss, run.optimizer, run.model.parameters(), run.cfg.grad_clip)
            value = loss.item()
            average = beta * average + (1 - beta) * value
            smoothed = average / (1 - beta ** (step + 1))
            result.lrs.append(lr)
            result.losses.append(value)
            result.smoothed.append(smoothed)
            best = min(best, smoothed)
            step += 1
            if step >= steps or not math.isfinite(smoothed) or (step > 10 and smoothed > 4 * best):
                return result
        epoch += 1
    return result


def _suggest(result: LRFindResult) -> None:
    finite = [(lr, s) for lr, s in zip(result.lrs, result.smoothed) if math.isfinite(s)]
    if len(finite) < 5:
        raise ValueError("lr-find: the loss diverged within a few steps; lower --start-lr")
    lrs, smoothed = zip(*finite)
    low = min(range(len(smoothed)), key=smoothed.__getitem__)
    result.min_loss_lr = lrs[low]
    result.suggestion = lrs[low] / 10
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / (math.log(lrs[i + 1]) - math.log(lrs[i - 1]))
              for i in range(1, max(2, low))]
    result.steepest = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)] if slopes else lrs[low]


def _write(result: LRFindResult, cfg: TrainConfig) -> None:
    with open(result.run_dir / "lr_find.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["lr", "loss", "smoothed_loss"])
        writer.writerows(zip(result.lrs, result.losses, result.smoothed))
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, alpha=0.3, label="loss")
    ax.plot(result.lrs, result.smoothed, label="smoothed loss")
    ax.axvline(result.suggestion, color="C3", linestyle="--", label=f"suggestion {result.suggestion:.3g}")
    ax.axvline(result.steepest, color="C2", linestyle=":", label=f"steepest {result.steepest:.3g}")
    finite = [s for s in result.smoothed if math.isfinite(s)]
    ax.set_ylim(min(finite) * 0.9, min(max(finite), 3 * min(finite)))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title(f"learning-rate range test: {cfg.model} on {cfg.dataset}, {cfg.optimizer}, batch {cfg.batch_size}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(result.run_dir / "lr_find.png", dpi=110)


def lr_find(config: Union[TrainConfig, Dict[str, Any], None] = None, explicit: Optional[set] = None,
            steps: int = 100, start_lr: float = 1e-6, end_lr: float = 10.0, **overrides) -> LRFindResult:
    """Run the range test for a training config (the same fields as :func:`moderncnn.train`) and write
    lr_find.csv and lr_find.png to its own run directory (default ``runs/<time>-lr-find-<model>-<dataset>``)."""
    config = TrainConfig.from_dict(config or {}) if not isinstance(config, TrainConfig) else config
    if overrides:
        TrainConfig.from_dict(overrides, "lr_find()")  # names an unknown field and the closest valid one
        config = dataclasses.replace(config, **overrides)
    if config.budget or config.resume:
        raise UsageError("lr-find sweeps a fixed number of steps from the initial weights: it takes neither "
                         "--budget nor --resume")
    if not 0 < start_lr < end_lr or steps < 5:
        raise UsageError(f"lr-find needs 0 < --start-lr < --end-lr and at least 5 steps, got {start_lr:g}, "
                         f"{end_lr:g}, {steps}")
    explicit = set(explicit or ()) | {k for k, v in overrides.items() if v is not None}
    resolved = resolve_config(config, explicit)
    cfg = resolved.config
    if not cfg.name:
        cfg = dataclasses.replace(cfg, name=f"{time.strftime('%Y%m%d-%H%M%S')}-lr-find-{cfg.model}-{cfg.dataset}")
        resolved = dataclasses.replace(resolved, config=cfg)
    run = None
    try:
        run = build_setup(resolved)
        result = _sweep(run, steps, start_lr, end_lr)
        _suggest(result)
        if run.is_main:
            _write(result, cfg)
        return result
    finally:
        if run is not None and run.lock is not None:
            run.lock.release()
        cleanup_distributed()
