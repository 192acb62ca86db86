"""Compare architectures: train several models on the same data, recipe and budget, then write one
report (report.md, results.csv, accuracy.png, tradeoff.png).

Each model trains in its own process (``python -m moderncnn train``) inside the comparison directory,
so every peak-memory figure is that model's alone, and a crash of one model does not lose the others.
Re-running the same command resumes: finished models are skipped, interrupted ones continue.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .cli import _EXTRA_COMMANDS
from .models import list_models
from .report.plots import scored
from .report.run import read_metrics
from .report.summary import human
from .train.budget import parse_budget

__all__ = ["compare", "parse_budget", "write_comparison_report"]

RESULT_FIELDS = ["model", "params", "flops_per_image", "peak_memory_mb", "train_seconds", "images_per_second",
                 "best_acc", "final_acc", "epochs_done"]


def compare(models: Sequence[str], dataset: str = "fashion-mnist", epochs: Optional[int] = None,
            budget=None, image_size: Optional[int] = None, recipe: str = "fast", subset: Optional[int] = None,
            out: str = "runs", name: Optional[str] = None, progress: bool = True,
            train_args: Sequence[str] = ()) -> Path:
    """Train every model in ``models`` with the same settings; returns the comparison directory."""
    models = [m.strip() for m in models if m.strip()]
    known = set(list_models())
    unknown = [m for m in models if m not in known]
    if unknown:
        from .models import create_model
        create_model(unknown[0])  # raises the registry's error with the closest names
    if not models:
        raise ValueError("--models needs at least one model name")
    seconds = parse_budget(budget)
    comp_dir = Path(out) / (name or f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-compare-{dataset}")
    comp_dir.mkdir(parents=True, exist_ok=True)
    command = "moderncnn compare " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["compare"] \
        else f"compare(models={list(models)}, dataset={dataset!r}, epochs={epochs}, budget={budget!r}, recipe={recipe!r})"
    settings = {"models": list(models), "dataset": dataset, "epochs": epochs, "budget_seconds": seconds,
                "image_size": image_size, "recipe": recipe, "subset": subset, "command": command,
                "train_args": list(train_args)}
    settings_file = comp_dir / "compare.json"
    if settings_file.exists():
        previous = json.loads(settings_file.read_text())
        if previous.get("models") != settings["models"] or previous.get("recipe") != recipe:
            print(f"note: {comp_dir} held a comparison of {previous.get('models')}; continuing with {models}")
    settings_file.write_text(json.dumps(settings, indent=2) + "\n")

    for index, model in enumerate(models, 1):
        run_dir = comp_dir / model
        if (run_dir / "summary.json").is_file():
            print(f"[{index}/{len(models)}] {model}: finished earlier, skipped", flush=True)
            continue
        if (run_dir / "last.pt").is_file():
            cmd = ["train", "--resume", str(run_dir)]
            if epochs:
                cmd += ["--epochs", str(epochs)]
        else:
            cmd = ["train", "--model", model, "--dataset", dataset, "--recipe", recipe, "--out", str(comp_dir),
                   "--name", model, *train_args]
            if epochs:
                cmd += ["--epochs", str(epochs)]
            if image_size:
                cmd += ["--image-size", str(image_size)]
            if subset:
                cmd += ["--subset", str(subset)]
            if seconds:
                cmd += ["--budget", str(seconds)]
        if not progress:
            cmd.append("--no-progress")
        print(f"[{index}/{len(models)}] {model}: moderncnn {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        proc = subprocess.run([sys.executable, "-m", "moderncnn", *cmd])
        if proc.returncode in (130, 143):
            raise KeyboardInterrupt
        if proc.returncode != 0:
            print(f"[{index}/{len(models)}] {model}: failed with exit code {proc.returncode}; continuing",
                  file=sys.stderr, flush=True)
    write_comparison_report(comp_dir)
    print(f"comparison report: {comp_dir / 'report.md'}", flush=True)
    return comp_dir


def _collect(comp_dir: Path) -> List[Dict]:
    settings = json.loads((comp_dir / "compare.json").read_text())
    rows = []
    for model in settings["models"]:
        summary_file = comp_dir / model / "summary.json"
        if not summary_file.is_file():
            continue
        s = json.loads(summary_file.read_text())
        s["history"] = read_metrics(comp_dir / model / "metrics.csv")
        rows.append(s)
    rows.sort(key=lambda r: r["best_acc"], reverse=True)
    return rows


def write_comparison_report(comp_dir: Path) -> Path:
    """results.csv, accuracy.png, tradeoff.png and report.md from the finished runs in ``comp_dir``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    comp_dir = Path(comp_dir)
    settings = json.loads((comp_dir / "compare.json").read_text())
    rows = _collect(comp_dir)
    with open(comp_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow(r)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        h = scored(r["history"])  # --eval-every leaves some epochs without test figures
        ax.plot([x["epoch"] for x in h], [x["test_acc"] for x in h], "o-", label=r["model"], markersize=3)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{settings['dataset']}: test accuracy per epoch ({settings['recipe']} recipe)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(comp_dir / "accuracy.png", dpi=110)
    plt.close(fig)

    fig, (ax_f, ax_t) = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((ax_f, "flops_per_image", "FLOPs per image"), (ax_t, "train_seconds", "training time, s")):
        for r in rows:
            ax.scatter(r[key], r["best_acc"], s=30)
            ax.annotate(r["model"], (r[key], r["best_acc"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        values = [r[key] for r in rows if r[key] > 0]
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
        ax.set_ylabel("best test accuracy")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"accuracy against cost on {settings['dataset']}")
    fig.tight_layout()
    fig.savefig(comp_dir / "tradeoff.png", dpi=110)
    plt.close(fig)

    env = f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs"
    try:
        import torch
        env += f", torch {torch.__version__}"
    except ImportError:
        pass
    lines = [f"# Comparison on {settings['dataset']}", "",
             f"Command: `{settings['command']}`", "",
             f"Environment: {env}. {_settings_text(settings)}.", "",
             "| model | params | FLOPs/image | peak memory | train time | images/s | best acc | final acc | epochs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params']:,} | {human(r['flops_per_image'])} | "
                     f"{r['peak_memory_mb']:.0f} MB | {r['train_seconds']:.0f}s | {r['images_per_second']:.0f} | "
                     f"{r['best_acc']:.4f} | {r['final_acc']:.4f} | {r['epochs_done']} |")
    missing = [m for m in settings["models"] if m not in {r["model"] for r in rows}]
    if missing:
        lines += ["", f"Not finished (re-run the command to resume): {', '.join(missing)}."]
    lines += ["", "Peak memory is the training process's peak resident memory on the CPU (max allocated on a GPU).",
              "", "![accuracy](accuracy.png)", "", "![tradeoff](tradeoff.png)", ""]
    lines += [f"- [{r['model']}]({r['model']}/report.md)" for r in rows]
    (comp_dir / "report.md").write_text("\n".join(lines) + "\n")
    return comp_dir / "report.md"


def _settings_text(settings: Dict) -> str:
    parts = [f"Recipe `{settings['recipe']}`"]
    if settings.get("epochs"):
        parts.append(f"{settings['epochs']} epochs")
    if settings.get("budget_seconds"):
        parts.append(f"budget {settings['budget_seconds']:.0f}s of training per model")
    if settings.get("subset"):
        parts.append(f"subset of {settings['subset']} train and test images")
    if settings.get("image_size"):
        parts.append(f"images resized to {settings['image_size']}")
    return ", ".join(parts)


def cmd_compare(args) -> int:
    passthrough = []
    for flag in ("lr", "muon_lr", "batch_size", "optimizer", "schedule", "seed", "device", "data_dir", "augment"):
        value = getattr(args, flag)
        if value is not None:
            passthrough += [f"--{flag.replace('_', '-')}", str(value)]
    if args.channels_last:
        passthrough.append("--channels-last")
    if args.tta:
        passthrough += ["--tta", str(args.tta)]
    compare(args.models.split(","), dataset=args.dataset, epochs=args.epochs, budget=args.budget,
            image_size=args.image_size, recipe=args.recipe, subset=args.subset, out=args.out, name=args.name,
            progress=args.progress, train_args=passthrough)
    return 0


def register(sub) -> None:
    p = sub.add_parser("compare", help="train several models alike and write one comparison report")
    p.add_argument("--models", required=True, help="comma-separated model names")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--budget", default=None,
                   help="wall-clock training time per model, e.g. 10m: each plans its epochs to fill it "
                        "(--epochs caps them)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--recipe", default="fast")
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--out", default="runs")
    p.add_argument("--name", default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    for flag, kind in (("--lr", float), ("--muon-lr", float), ("--batch-size", int), ("--optimizer", str),
                       ("--schedule", str), ("--seed", int), ("--device", str), ("--augment", str)):
        p.add_argument(flag, type=kind, default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--tta", type=int, nargs="?", const=1, default=None, metavar="LEVEL",
                   help="test-time augmentation of each model's final evaluation (1 flip, 2 flip + shifts)")
    p.set_defaults(func=cmd_compare)


_EXTRA_COMMANDS.append(register)
