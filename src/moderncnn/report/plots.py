"""Plots of a run: learning curves, a prediction grid, a confusion matrix, the worst-classified images.

Drawn on :class:`matplotlib.figure.Figure` objects and written through their own Agg canvas: importing or
calling this module never touches pyplot's state or the user's matplotlib backend."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure

from ..runs import EpochRecord

__all__ = ["scored", "plot_curves", "draw_curves", "plot_top_losses", "plot_predictions", "plot_confusion", "confusion_matrix", "plot_comparison_curves",
           "plot_tradeoff"]


def scored(history: Sequence[EpochRecord]) -> List[EpochRecord]:
    """The epochs that scored the test set (``--eval-every`` leaves the others without test figures)."""
    return [row for row in history if row.scored]


def _plot_split(ax_loss, ax_acc, rows: Sequence[EpochRecord], split: str, marker: str) -> None:
    rows = [r for r in rows if getattr(r, f"{split}_acc") is not None]
    if rows:
        epochs = [r.epoch for r in rows]
        ax_loss.plot(epochs, [getattr(r, f"{split}_loss") for r in rows], marker, label=f"{split} loss")
        ax_acc.plot(epochs, [getattr(r, f"{split}_acc") for r in rows], marker, label=f"{split} acc")


def plot_curves(history: Sequence[EpochRecord], path: Path, title: str = "", label_smoothing: float = 0.0,
                chosen_epoch: Optional[int] = None) -> Path:
    """Loss and accuracy against epochs (d2l's Animator picture, split into two panels): training,
    validation (where the run held one out) and test. ``chosen_epoch`` marks best.pt's epoch.

    With label smoothing the training loss is the smoothed loss the optimizer sees, which cannot fall to
    the plain cross-entropy of the test set; the legend says so."""
    fig = Figure(figsize=(10, 3.8))
    draw_curves(fig, history, title, label_smoothing, chosen_epoch)
    fig.savefig(path, dpi=110)
    return path


def draw_curves(fig: Figure, history: Sequence[EpochRecord], title: str = "", label_smoothing: float = 0.0,
                chosen_epoch: Optional[int] = None) -> Figure:
    """Draw :func:`plot_curves`' two panels on ``fig`` (cleared first: a live figure is redrawn in place)."""
    fig.clear()
    epochs = [row.epoch for row in history]
    ax_loss, ax_acc = fig.subplots(1, 2)
    train_label = f"train loss (label smoothing {label_smoothing:g})" if label_smoothing else "train loss"
    ax_loss.plot(epochs, [r.train_loss for r in history], "o-", label=train_label)
    ax_acc.plot(epochs, [r.train_acc for r in history], "o-", label="train acc")
    _plot_split(ax_loss, ax_acc, history, "val", "^-.")
    # the plain test figures only: a TTA-scored epoch has its own marker below (a line to it would join two kinds)
    _plot_split(ax_loss, ax_acc, [r for r in history if not r.tta], "test", "s--")
    # Epochs scored with test-time augmentation (the last one, where a recipe asks for it) get their own
    # marker: the step up there is the augmentation's, not one more epoch's learning.
    tta_rows = [r for r in history if r.tta and r.scored]
    if tta_rows:
        levels = sorted({int(r.tta) for r in tta_rows})
        ax_acc.plot([r.epoch for r in tta_rows], [r.test_acc for r in tta_rows], "*", color="C3",
                    markersize=12, label=f"test acc with TTA (level {', '.join(map(str, levels))})")
        ax_loss.plot([r.epoch for r in tta_rows], [r.test_loss for r in tta_rows], "*", color="C3",
                     markersize=12, label="test loss with TTA")
    if scored(history):
        final = scored(history)[-1]
        ax_acc.annotate(f"{final.test_acc:.4f}", (final.epoch, final.test_acc), textcoords="offset points",
                        xytext=(0, -14), ha="center", fontsize=8)
    if chosen_epoch:
        ax_acc.axvline(chosen_epoch, color="0.5", linestyle=":", label=f"best.pt (epoch {chosen_epoch}, on val)")
    ax_loss.legend()
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend(loc="lower right", fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_predictions(images: torch.Tensor, labels: Sequence[int], predictions: Sequence[int],
                     classes: Sequence[str], path: Path, columns: int = 8) -> Path:
    """A grid of test images titled "true / predicted"; mistakes in red with a red frame."""
    n = len(images)
    rows = max(1, int(np.ceil(n / columns)))
    fig = Figure(figsize=(columns * 1.45, rows * 1.75))
    axes = fig.subplots(rows, columns)
    axes = np.atleast_1d(axes).ravel()
    for ax in axes:
        ax.axis("off")
    for i in range(n):
        img = images[i].numpy()
        ax = axes[i]
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(img.transpose(1, 2, 0))
        ok = int(labels[i]) == int(predictions[i])
        color = "black" if ok else "red"
        ax.set_title(f"{classes[int(labels[i])]}\n{'' if ok else '→ '}{classes[int(predictions[i])]}",
                     fontsize=7, color=color)
        if not ok:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("red")
                spine.set_linewidth(2)
    wrong = sum(int(labels[i]) != int(predictions[i]) for i in range(n))
    fig.suptitle(f"{n} test images (a fixed random sample): true label above, prediction below; "
                 f"{wrong} wrong, in red", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_top_losses(images: torch.Tensor, labels: Sequence[int], predictions: Sequence[int],
                    confidence: Sequence[float], true_prob: Sequence[float], classes: Sequence[str], path: Path,
                    columns: int = 4) -> Path:
    """The test images with the highest loss (fastai's ``plot_top_losses``): each titled with its true
    label, the predicted label and that prediction's probability, and the loss."""
    n = len(images)
    rows = max(1, int(np.ceil(n / columns)))
    fig = Figure(figsize=(columns * 2.2, rows * 2.4))
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for i in range(n):
        img = images[i].numpy()
        if img.shape[0] == 1:
            axes[i].imshow(img[0], cmap="gray", vmin=0, vmax=255)
        else:
            axes[i].imshow(img.transpose(1, 2, 0))
        loss = -np.log(max(float(true_prob[i]), 1e-12))
        axes[i].set_title(f"true {classes[int(labels[i])]}\npred {classes[int(predictions[i])]} "
                          f"({float(confidence[i]):.2f})\nloss {loss:.2f}", fontsize=7,
                          color="red" if int(labels[i]) != int(predictions[i]) else "black")
    fig.suptitle(f"the {n} test images with the highest loss: true label, prediction (its probability), loss",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def plot_confusion(labels: torch.Tensor, predictions: torch.Tensor, classes: Sequence[str], path: Path) -> Path:
    """Row-normalised confusion matrix (rows: true class) with counts in the cells."""
    k = len(classes)
    cm = confusion_matrix(labels, predictions, k).numpy()
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = max(5, 0.55 * k + 2)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    total = int(cm.sum())
    acc = np.trace(cm) / max(total, 1)
    ax.set_title(f"confusion matrix ({total:,} test images, accuracy {acc:.4f})", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_comparison_curves(histories: Sequence[Tuple[str, Sequence[EpochRecord]]], path: Path, title: str) -> Path:
    """Test accuracy per epoch of several runs, one line each."""
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, history in histories:
        rows = scored(history)  # --eval-every leaves some epochs without test figures
        ax.plot([r.epoch for r in rows], [r.test_acc for r in rows], "o-", label=name, markersize=3)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_tradeoff(points: Sequence[Tuple[str, float, float, float]], path: Path, title: str) -> Path:
    """Final test accuracy against FLOPs per image and against training time: (name, flops, seconds, acc)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter
    from .summary import human
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    for ax, column, label in ((axes[0], 1, "FLOPs per image"), (axes[1], 2, "time, s (training and evaluation)")):
        for point in points:
            ax.scatter(point[column], point[3], s=30)
            ax.annotate(point[0], (point[column], point[3]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        values = [p[column] for p in points if p[column] > 0]
        # A log axis only where the costs span a decade; within one, matplotlib labels its minor ticks
        # (1.5x10^2, 1.6x10^2, ...) on top of each other.
        wide = bool(values) and max(values) >= 10 * min(values)
        if wide:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v, spec='.3g')))  # 240M, 150
        ax.margins(x=0.12)  # room for the labels of the outermost points
        ax.set_xlabel(label + (" (log scale)" if wide else ""))
        ax.set_ylabel("final test accuracy")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
