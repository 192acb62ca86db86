"""report.md for one run directory: reads config.json, metrics.csv and predictions.pt; trains nothing."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List

import torch

from ..data.loader import Augment
from ..train.optim import describe_optimizer
from .plots import plot_confusion, plot_curves, plot_predictions, scored
from .summary import human

__all__ = ["read_metrics", "write_run_report"]


def read_metrics(path: Path) -> List[Dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(f)]


def _tta_words(level) -> str:
    level = int(level or 0)
    if not level:
        return ""
    views = "flip" if level == 1 else "flip + one-pixel shifts"
    return f", TTA level {level} ({views}) on the last epoch's test figures"


def _progressive_words(cfg, full: int) -> str:
    start = cfg.get("progressive_size") or 0
    if not 0 < start < full:
        return ""
    return (f", progressive resizing from {start}x{start} to {full}x{full} over the first "
            f"{cfg['progressive_fraction']:.0%} of the epochs")


def _budget_words(cfg, epochs_done: int) -> str:
    if not cfg.get("budget"):
        return ""
    return (f", time budget {cfg['budget']:.0f}s (the epochs, {epochs_done} here, planned from measured times so "
            f"that the schedule ends with the budget)")


def _epochs_words(history) -> str:
    """'4 epochs', or '4.62 epochs (the last on 31,000 of 50,000 training images)' after a time budget's
    partial last epoch (measured against the epochs before it, which may drop a last short batch)."""
    last = history[-1].get("train_images") if history else None
    train_images = max((r.get("train_images") or 0) for r in history[:-1]) if len(history) > 1 else 0
    if not (train_images and last and last < train_images):
        return f"{len(history)} epoch{'s' if len(history) != 1 else ''}"
    return (f"{len(history) - 1 + last / train_images:.2f} epochs (the last on {last:,.0f} of {train_images:,.0f} "
            f"training images)")


def _size_mark(row, full: int) -> str:
    side = int(row.get("train_size") or full)
    return f" (at {side}x{side})" if side != full else ""


def _figure(row, key: str) -> str:
    return f"{row[key]:.4f}" if row.get(key) is not None else "-"


def _tta_mark(row) -> str:
    return f" (TTA {int(row['tta'])})" if row.get("tta") else ""


def write_run_report(run_dir: Path) -> Path:
    """Draw curves.png, predictions.png and confusion.png and write report.md in ``run_dir``."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "config.json").read_text())
    cfg = info["config"]
    history = read_metrics(run_dir / "metrics.csv")
    plot_curves(history, run_dir / "curves.png", f"{cfg['model']} on {cfg['dataset']}",
                label_smoothing=cfg.get("label_smoothing") or 0.0)
    preds = torch.load(run_dir / "predictions.pt", weights_only=True)
    classes = preds["classes"]
    plot_predictions(preds["sample_images"], preds["labels"][preds["sample_index"]],
                     preds["predictions"][preds["sample_index"]], classes, run_dir / "predictions.png")
    plot_confusion(preds["labels"], preds["predictions"], classes, run_dir / "confusion.png")

    final, best = history[-1], max(scored(history), key=lambda r: r["test_acc"])
    total = sum(r["seconds"] for r in history)
    versions = info.get("versions", {})
    per_class = _per_class_accuracy(preds["labels"], preds["predictions"], len(classes))
    lines = [
        f"# {cfg['model']} on {cfg['dataset']}",
        "",
        f"**Final test accuracy {final['test_acc']:.4f}** (best {best['test_acc']:.4f} at epoch {best['epoch']}), "
        f"{_epochs_words(history)} in {total / 60:.1f} min on {versions.get('device', '?')} "
        f"({versions.get('device_name', '')}, {versions.get('threads', '?')} threads).",
        "",
        "| | |",
        "|---|---|",
        f"| model | `{cfg['model']}` {info.get('model_kwargs') or ''} |",
        f"| parameters | {info['params']:,} (trainable {info.get('trainable_params', info['params']):,}) |",
        f"| FLOPs per image | {human(info['flops_per_image'])} (multiply-add = 2) |",
        f"| data | {cfg['dataset']}: {info['train_images']:,} train / {info['test_images']:,} test images, "
        f"{info['in_chans']}x{info['image_size']}x{info['image_size']}, {len(classes)} classes"
        f"{', subset ' + str(cfg['subset']) if cfg.get('subset') else ''} |",
        f"| normalisation | mean {info['normalization']['mean']}, std {info['normalization']['std']} "
        f"(from the training set) |",
        f"| recipe | `{cfg['recipe']}`: "
        f"{describe_optimizer(cfg['optimizer'], cfg['lr'], cfg['momentum'], cfg.get('muon_lr'))}, {cfg['schedule']} schedule"
        f"{', warmup ' + str(cfg['warmup']) + ' epochs' if cfg['warmup'] else ''}, batch {cfg['batch_size']}, "
        f"weight decay {cfg['weight_decay']:g}, label smoothing {cfg['label_smoothing']:g}, "
        f"augmentation {cfg['augment']}{' (alternating flip)' if Augment.parse(cfg['augment']).alternate_flip else ''}"
        f"{', EMA ' + str(cfg['ema']) if cfg['ema'] else ''}"
        f"{_progressive_words(cfg, info['image_size'])}"
        f"{_budget_words(cfg, len(history))}"
        f"{_tta_words(cfg['tta'])}{', init ' + cfg['init'] if cfg['init'] else ''} |",
        f"| seed | {cfg['seed']} |",
        f"| throughput | {sum(r['images_per_second'] for r in history) / len(history):.0f} training images/s "
        f"(mean over epochs){', ' + info['precision'] if info.get('precision') else ''} |",
        f"| software | Python {versions.get('python')}, torch {versions.get('torch')}, "
        f"moderncnn {versions.get('moderncnn')} |",
    ]
    if info.get("frozen"):
        lines.append(f"| trained parameters | {info['frozen']} |")
    lines += ["", "## Curves", "", "![curves](curves.png)", ""]
    if cfg.get("ema"):
        # The evaluated model is the weight average, which starts near the random initialisation.
        lines += [f"Test figures are those of the EMA weights (decay {cfg['ema']}); they trail the training "
                  "weights for the first epochs.", ""]
    if any(r.get("tta") for r in history):
        lines += ["Epochs marked TTA were scored with test-time augmentation (the last one); the others on "
                  "the plain test images.", ""]
    if len(scored(history)) < len(history):
        lines += [f"The test set was scored every {cfg['eval_every']} epochs and after the last (`--eval-every "
                  f"{cfg['eval_every']}`); the other rows have no test figures." if cfg.get("eval_every") else
                  "The test set was scored after the last epoch only (`--eval-every 0`).", ""]
    lines += ["| epoch | train loss | train acc | test loss | test acc | lr | seconds | images/s |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['epoch']} | {r['train_loss']:.4f} | {r['train_acc']:.4f} | {_figure(r, 'test_loss')} | "
              f"{_figure(r, 'test_acc')}{_tta_mark(r)} | "
              f"{r['lr']:.4g} | {r['seconds']:.1f} | {r['images_per_second']:.0f}{_size_mark(r, info['image_size'])} |"
              for r in history]
    lines += ["", "## Predictions", "", "![predictions](predictions.png)", "",
              "## Confusion matrix", "", "![confusion](confusion.png)", "",
              "| class | test accuracy |", "|---|---:|"]
    lines += [f"| {c} | {a:.4f} |" for c, a in zip(classes, per_class)]
    lines += ["", f"Checkpoints: `last.pt` (resume with `moderncnn train --resume {run_dir}`), `best.pt` "
              f"(`moderncnn eval {run_dir}{' --tta ' + str(int(cfg['tta'])) if cfg.get('tta') else ''}`, `moderncnn predict {run_dir} IMAGE...`).", ""]
    (run_dir / "report.md").write_text("\n".join(lines))
    return run_dir / "report.md"


def _per_class_accuracy(labels: torch.Tensor, predictions: torch.Tensor, k: int) -> List[float]:
    out = []
    for c in range(k):
        mask = labels == c
        out.append(float((predictions[mask] == c).float().mean()) if mask.any() else float("nan"))
    return out
