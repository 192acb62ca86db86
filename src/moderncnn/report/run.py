"""report.md for one run directory: reads the run through :func:`moderncnn.runs.load_run` and its
predictions.pt; trains nothing."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import torch

from ..data.loader import Augment
from ..checkpoint import write_text_atomic
from ..runs import EpochRecord, Run, RunFileError, epochs_trained, load_run
from .plots import plot_confusion, plot_curves, plot_predictions, plot_top_losses, scored
from .summary import human

__all__ = ["write_run_report"]


def _tta_words(level, below: float = 1.0) -> str:
    level = int(level or 0)
    if not level:
        return ""
    views = "flip" if level == 1 else "flip + one-pixel shifts"
    which = f" for the images whose plain top probability is under {below:g}" if below < 1 else ""
    return f", TTA level {level} ({views}){which} on the last epoch's test figures"


def _progressive_words(cfg, full: int) -> str:
    start = cfg.progressive_size or 0
    if not 0 < start < full:
        return ""
    return (f", progressive resizing from {start}x{start} to {full}x{full} over the first "
            f"{cfg.progressive_fraction:.0%} of the epochs")


def _budget_words(cfg, epochs_done: int) -> str:
    if not cfg.budget:
        return ""
    return (f", time budget {cfg.budget:.0f}s (the epochs, {epochs_done} here, planned from measured times so "
            f"that the schedule ends with the budget)")


def _epochs_words(history: List[EpochRecord], train_images: int = 0, batch_size: int = 1) -> str:
    """'4 epochs', or '4.62 epochs (the last on 31,000 of 50,000 training images)' after a time budget's
    partial last epoch."""
    epochs, last, whole = epochs_trained(history, train_images, batch_size)
    if not whole:
        return f"{len(history)} epoch{'s' if len(history) != 1 else ''}"
    return f"{epochs:.2f} epochs (the last on {last:,.0f} of {whole:,.0f} training images)"


def _folder_words(info) -> str:
    if info.config.dataset != "imagefolder":
        return ""
    storage = "memory-mapped from the disk cache" if info.data_storage == "disk" else "decoded into memory"
    skipped = f", {info.skipped_files} unreadable file{'s' if info.skipped_files != 1 else ''} skipped"
    return f"; resized by {info.config.resize}, {storage}{skipped if info.skipped_files else ''}"


def _figure(value: Optional[float]) -> str:
    return f"{value:.4f}" if value is not None else "-"


def _chosen(run: Run) -> Optional[EpochRecord]:
    """best.pt's epoch: the highest validation accuracy (the first of equals), None without validation."""
    validated = [r for r in run.history if r.val_acc is not None]
    return max(validated, key=lambda r: r.val_acc) if validated else None


def _headline(run: Run) -> str:
    final, chosen = scored(run.history)[-1], _chosen(run)
    versions = run.info.versions
    text = f"**Final test accuracy {final.test_acc:.4f}**"
    if chosen is not None:
        text += f"; best.pt is epoch {chosen.epoch}, chosen on validation accuracy {chosen.val_acc:.4f}"
    total = sum(r.seconds for r in run.history)
    epochs = _epochs_words(run.history, run.info.train_images, run.config.batch_size or 1)
    return (f"{text}. {epochs} in {total / 60:.1f} min on {versions.get('device', '?')} "
            f"({versions.get('device_name', '')}, {versions.get('threads', '?')} threads).")


def _settings_rows(run: Run, classes: List[str]) -> List[str]:
    info, cfg = run.info, run.config
    spec = info.spec
    augment = f"{cfg.augment}{' (alternating flip)' if Augment.parse(cfg.augment).alternate_flip else ''}"
    rows = [
        "| | |", "|---|---|",
        f"| model | `{cfg.model}` {spec.model_kwargs or ''} |",
        f"| parameters | {info.params:,} (trainable {info.trainable_params or info.params:,}) |",
        f"| FLOPs per image | {human(info.flops_per_image)} (multiply-add = 2) |",
        f"| data | {cfg.dataset}: {info.train_images:,} train / {info.test_images:,} test images, "
        f"{spec.in_chans}x{spec.image_size}x{spec.image_size}, {len(classes)} classes"
        f"{', subset ' + str(cfg.subset) if cfg.subset else ''}{_folder_words(info)} |",
        f"| validation | {info.validation or 'none: no best.pt, the final weights (last.pt) are the model'} |",
        f"| normalisation | mean {spec.mean}, std {spec.std} (from the training set) |",
        f"| recipe | `{cfg.recipe}`: {cfg.describe_optimizer()}, {cfg.schedule} schedule"
        f"{', warmup ' + str(cfg.warmup) + ' epochs' if cfg.warmup else ''}, batch {cfg.batch_size}, "
        f"weight decay {cfg.weight_decay:g}, label smoothing {cfg.label_smoothing:g}, augmentation {augment}"
        f"{', EMA ' + str(cfg.ema) if cfg.ema else ''}{_progressive_words(cfg, spec.image_size)}"
        f"{_budget_words(cfg, len(run.history))}{_tta_words(cfg.tta, cfg.tta_below)}"
        f"{', init ' + cfg.init if cfg.init else ''} |",
        f"| seed | {cfg.seed} |",
        f"| precision | {info.precision}{_skipped_words(run.history)}"
        f"{'' if cfg.fp32_precision == 'highest' else f'; float32 matrix products: {cfg.fp32_precision}'} |",
        f"| throughput | {sum(r.images_per_second for r in run.history) / len(run.history):.0f} training images/s "
        f"(mean over epochs) |",
        f"| software | Python {info.versions.get('python')}, torch {info.versions.get('torch')}, "
        f"moderncnn {info.versions.get('moderncnn')} |",
    ]
    if info.frozen:
        rows.append(f"| trained parameters | {info.frozen} |")
    return rows


def _skipped_words(history) -> str:
    skipped = sum(r.skipped_steps for r in history)
    return f"; the gradient scaler skipped {skipped} steps whose gradients overflowed" if skipped else ""


def _curve_notes(run: Run) -> List[str]:
    cfg, lines = run.config, []
    if cfg.ema:  # the evaluated model is the weight average, which starts near the random initialisation
        lines += [f"Validation and test figures are those of the EMA weights (decay {cfg.ema}); they trail the "
                  "training weights for the first epochs.", ""]
    if any(r.tta for r in run.history):
        lines += ["Epochs marked TTA were scored with test-time augmentation (the last one); the others on "
                  "the plain test images.", ""]
    if len(scored(run.history)) < len(run.history):
        lines += [f"The test set was scored every {cfg.eval_every} epochs and after the last (`--eval-every "
                  f"{cfg.eval_every}`); the other rows have no test figures." if cfg.eval_every else
                  "The test set was scored after the last epoch only (`--eval-every 0`).", ""]
    lines.append("The test set chooses nothing: it is scored for these curves only.")
    return lines + [""]


def _epoch_rows(run: Run) -> List[str]:
    full = run.info.spec.image_size
    rows = ["| epoch | train loss | train acc | val acc | test loss | test acc | lr | seconds | images/s |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in run.history:
        size = f" (at {r.train_size}x{r.train_size})" if r.train_size and r.train_size != full else ""
        tta = f" (TTA {r.tta})" if r.tta else ""
        rows.append(f"| {r.epoch} | {r.train_loss:.4f} | {r.train_acc:.4f} | {_figure(r.val_acc)} | "
                    f"{_figure(r.test_loss)} | {_figure(r.test_acc)}{tta} | {r.lr:.4g} | {r.seconds:.1f} | "
                    f"{r.images_per_second:.0f}{size} |")
    return rows


def _checkpoint_note(run: Run) -> str:
    tta = f" --tta {int(run.config.tta)}" if run.config.tta else ""
    if run.config.tta and run.config.tta_below < 1:
        tta += f" --tta-below {run.config.tta_below:g}"
    use = f"`moderncnn eval {run.path}{tta}`, `moderncnn predict {run.path} IMAGE...`"
    if _chosen(run) is not None:
        return (f"Checkpoints: `best.pt`, the epoch chosen on validation accuracy ({use}), and `last.pt` "
                f"(resume with `moderncnn train --resume {run.path}`).")
    return (f"Checkpoints: `last.pt`, the final weights ({use}; resume with `moderncnn train --resume "
            f"{run.path}`). No best.pt: without a validation set (`--val-split`) nothing is chosen.")


def write_run_report(run_dir: Path) -> Path:
    """Draw curves.png, predictions.png and confusion.png and write report.md in ``run_dir``."""
    run = load_run(run_dir)
    cfg = run.config
    chosen = _chosen(run)
    plot_curves(run.history, run.path / "curves.png", f"{cfg.model} on {cfg.dataset}",
                label_smoothing=cfg.label_smoothing or 0.0, chosen_epoch=chosen.epoch if chosen else None)
    preds = _read_predictions(run.path / "predictions.pt")
    classes = list(preds["classes"])
    plot_predictions(preds["sample_images"], preds["labels"][preds["sample_index"]],
                     preds["predictions"][preds["sample_index"]], classes, run.path / "predictions.png")
    plot_confusion(preds["labels"], preds["predictions"], classes, run.path / "confusion.png")
    worst = _plot_worst(preds, classes, run.path / "top_losses.png")
    per_class = _per_class_accuracy(preds["labels"], preds["predictions"], len(classes))
    lines = [f"# {cfg.model} on {cfg.dataset}", "", _headline(run), "", *_settings_rows(run, classes),
             "", "## Curves", "", "![curves](curves.png)", "", *_curve_notes(run), *_epoch_rows(run),
             "", "## Predictions", "", "![predictions](predictions.png)", "",
             "## Confusion matrix", "", "![confusion](confusion.png)", "", "| class | test accuracy |", "|---|---:|"]
    lines += [f"| {c} | {a:.4f} |" for c, a in zip(classes, per_class)]
    if worst:
        lines += ["", "## Worst-classified test images", "", "![top losses](top_losses.png)"]
    lines += ["", _checkpoint_note(run), ""]
    return write_text_atomic(run.path / "report.md", "\n".join(lines))


def _read_predictions(path: Path) -> dict:
    """predictions.pt, the final model's test predictions that ReportWriter saves at the run's end."""
    if not path.is_file():
        raise RunFileError(f"{path}: missing: the run has not finished; `moderncnn train --resume {path.parent}` "
                           f"completes it")
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, unpickling refused, ...
        raise RunFileError(f"{path}: damaged ({str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r})") \
            from None


def _plot_worst(preds, classes: List[str], path: Path) -> bool:
    """top_losses.png from predictions.pt (those written before it had no worst images: none drawn)."""
    if "worst_index" not in preds:
        return False
    index = preds["worst_index"]
    plot_top_losses(preds["worst_images"], preds["labels"][index], preds["predictions"][index],
                    preds["confidence"][index], preds["true_prob"][index], classes, path)
    return True


def _per_class_accuracy(labels: torch.Tensor, predictions: torch.Tensor, k: int) -> List[float]:
    out = []
    for c in range(k):
        mask = labels == c
        out.append(float((predictions[mask] == c).float().mean()) if mask.any() else float("nan"))
    return out
