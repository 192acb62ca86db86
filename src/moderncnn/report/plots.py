"""Plots of a run: learning curves, a prediction grid, a confusion matrix (matplotlib, no display)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = ["scored", "plot_curves", "plot_predictions", "plot_confusion", "confusion_matrix"]


def scored(history: List[Dict[str, float]]) -> List[Dict[str, float]]:
    """The rows of epochs that scored the test set (``--eval-every`` leaves the others without test figures)."""
    return [row for row in history if row.get("test_acc") is not None]


def plot_curves(history: List[Dict[str, float]], path: Path, title: str = "", label_smoothing: float = 0.0) -> Path:
    """Loss and accuracy against epochs (d2l's Animator picture, split into two panels).

    With label smoothing the training loss is the smoothed loss the optimizer sees, which cannot fall to
    the plain cross-entropy of the test set; the legend says so."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    train_label = f"train loss (label smoothing {label_smoothing:g})" if label_smoothing else "train loss"
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label=train_label)
    tested = scored(history)
    ax_loss.plot([r["epoch"] for r in tested], [r["test_loss"] for r in tested], "s--", label="test loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_acc.plot(epochs, [r["train_acc"] for r in history], "o-", label="train acc")
    ax_acc.plot([r["epoch"] for r in tested], [r["test_acc"] for r in tested], "s--", label="test acc")
    # Epochs scored with test-time augmentation (the last one, where a recipe asks for it) get their own
    # marker: the step up there is the augmentation's, not one more epoch's learning.
    tta_rows = [r for r in history if r.get("tta")]
    if tta_rows:
        levels = sorted({int(r["tta"]) for r in tta_rows})
        ax_acc.plot([r["epoch"] for r in tta_rows], [r["test_acc"] for r in tta_rows], "*", color="C3",
                    markersize=12, label=f"test acc with TTA (level {', '.join(map(str, levels))})")
        ax_loss.plot([r["epoch"] for r in tta_rows], [r["test_loss"] for r in tta_rows], "*", color="C3",
                     markersize=12, label="test loss with TTA")
    best = max(tested, key=lambda r: r["test_acc"])
    ax_acc.annotate(f"{best['test_acc']:.4f}", (best["epoch"], best["test_acc"]), textcoords="offset points",
                    xytext=(0, -14), ha="center", fontsize=8)
    ax_loss.legend()
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy")
    ax_acc.legend(loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_predictions(images: torch.Tensor, labels: Sequence[int], predictions: Sequence[int],
                     classes: Sequence[str], path: Path, columns: int = 8) -> Path:
    """A grid of test images titled "true / predicted"; mistakes in red with a red frame."""
    n = len(images)
    rows = max(1, int(np.ceil(n / columns)))
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 1.45, rows * 1.75))
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
    plt.close(fig)
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
    fig, ax = plt.subplots(figsize=(size + 1, size))
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
    plt.close(fig)
    return path
