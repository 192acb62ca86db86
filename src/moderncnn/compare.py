"""Compare architectures: train several models on the same data, recipe and budget, then write one
report (report.md, results.csv, accuracy.png, tradeoff.png).

Each model trains in its own process (``python -m moderncnn train``) inside the comparison directory,
so every peak-memory figure is that model's alone, and a crash of one model does not lose the others.
Re-running the same command resumes: finished models are skipped, interrupted ones continue.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .checkpoint import write_text_atomic
from .models import create_model, is_model
from .report.plots import plot_comparison_curves, plot_tradeoff
from .report.summary import human
from .runs import Run, RunFileError, TrainConfig, load_run, read_json_file, run_name
from .training.budget import parse_budget

logger = logging.getLogger(__name__)

__all__ = ["compare", "parse_budget", "write_comparison_report"]

RESULT_FIELDS = ["model", "params", "flops_per_image", "peak_memory_mb", "train_seconds", "images_per_second",
                 "final_acc", "chosen_val_acc", "epochs_done"]
# Options that belong to each model's own run, not to the comparison.
_PER_RUN = ("model", "out", "name", "resume", "progress")


def _options(options: Dict[str, Any]) -> Dict[str, Any]:
    options = {k: v for k, v in options.items() if v is not None and k not in _PER_RUN}
    TrainConfig.from_dict(options, "compare")  # names an unknown option and the closest valid one
    if "budget" in options:
        options["budget"] = parse_budget(options["budget"])
    return options


def _train_command(model: str, run_dir: Path, comp_dir: Path, options_file: Path, train_args: Sequence[str],
                   progress: bool) -> List[str]:
    if (run_dir / "last.pt").is_file():
        cmd = ["train", "--resume", str(run_dir)]
    else:
        cmd = ["train", "--config", str(options_file), "--model", model, "--out", str(comp_dir), "--name", model,
               *train_args]
    return cmd + ([] if progress else ["--no-progress"])


def compare(models: Sequence[str], out: str = "runs", name: Optional[str] = None, progress: bool = True,
            train_args: Sequence[str] = (), **options) -> Path:
    """Train every model in ``models`` with the same training options (any :class:`TrainConfig` field:
    ``dataset``, ``epochs``, ``budget`` ("10m"), ``recipe``, ``batch_size``, ...; ``train_args`` adds raw
    ``moderncnn train`` flags). Returns the comparison directory."""
    models = [m.strip() for m in models if m.strip()]
    if not models:
        raise ValueError("--models needs at least one model name")
    for model in models:
        if not is_model(model):
            create_model(model)  # raises the registry's error with the closest names
    options = _options(options)
    dataset = options.get("dataset", "fashion-mnist")
    comp_dir = Path(out) / (name or run_name("compare", dataset))
    comp_dir.mkdir(parents=True, exist_ok=True)
    command = ("moderncnn compare " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["compare"]
               else f"compare({list(models)}, **{options})")
    settings_file = comp_dir / "compare.json"
    if settings_file.exists():
        previous = read_json_file(settings_file)
        if previous.get("models") != models:
            logger.info(f"note: {comp_dir} held a comparison of {previous.get('models')}; continuing with {models}")
    write_text_atomic(settings_file, json.dumps({"models": models, "options": options, "command": command,
                                                 "train_args": list(train_args)}, indent=2) + "\n")
    options_file = comp_dir / "train-options.json"
    write_text_atomic(options_file, json.dumps(options, indent=2) + "\n")
    for index, model in enumerate(models, 1):
        run_dir = comp_dir / model
        if (run_dir / "summary.json").is_file() and (run_dir / "report.md").is_file():
            logger.info(f"[{index}/{len(models)}] {model}: finished earlier, skipped")
            continue
        cmd = _train_command(model, run_dir, comp_dir, options_file, train_args, progress)
        logger.info(f"[{index}/{len(models)}] {model}: moderncnn {' '.join(shlex.quote(c) for c in cmd)}")
        proc = subprocess.run([sys.executable, "-m", "moderncnn", *cmd])
        if proc.returncode in (130, 143):
            raise KeyboardInterrupt
        if proc.returncode != 0:
            logger.warning(f"[{index}/{len(models)}] {model}: failed with exit code {proc.returncode}; continuing")
    write_comparison_report(comp_dir)
    logger.info(f"comparison report: {comp_dir / 'report.md'}")
    return comp_dir


def _finished_runs(comp_dir: Path, models: Sequence[str]) -> List[Run]:
    runs = []
    for model in models:
        try:
            run = load_run(comp_dir / model)
        except RunFileError:  # a damaged run counts as not finished: rerunning the comparison resumes it
            continue
        if run.summary is not None:
            runs.append(run)
    return sorted(runs, key=lambda r: r.summary.final_acc, reverse=True)


def _number(value: Any) -> Any:
    """5000 for the 5000.0 that a JSON round trip or a float flag made of a count."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _settings_text(options: Dict[str, Any]) -> str:
    parts = [f"Recipe `{options.get('recipe', 'fast')}`"]
    if options.get("epochs"):
        parts.append(f"{options['epochs']} epochs")
    if options.get("budget"):
        parts.append(f"budget {options['budget']:.0f}s per model (training and evaluation)")
    if options.get("subset"):
        parts.append(f"subset of {options['subset']} train and test images")
    if options.get("image_size"):
        parts.append(f"images resized to {options['image_size']}")
    others = {k: v for k, v in options.items() if k not in ("recipe", "epochs", "budget", "subset", "image_size",
                                                             "dataset", "data_dir")}
    if others:
        parts.append("options " + ", ".join(f"{k}={_number(v)}" for k, v in sorted(others.items())))
    return ", ".join(parts)


def write_comparison_report(comp_dir: Path) -> Path:
    """results.csv, accuracy.png, tradeoff.png and report.md from the finished runs in ``comp_dir``."""
    comp_dir = Path(comp_dir)
    settings = read_json_file(comp_dir / "compare.json")
    options = settings.get("options", {})
    dataset = options.get("dataset", "fashion-mnist")
    runs = _finished_runs(comp_dir, settings["models"])
    rows = [r.summary for r in runs]
    with open(comp_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
        writer.writeheader()
        writer.writerows({k: getattr(s, k) for k in RESULT_FIELDS} for s in rows)
    plot_comparison_curves([(r.summary.model, r.history) for r in runs], comp_dir / "accuracy.png",
                           f"{dataset}: test accuracy per epoch ({options.get('recipe', 'fast')} recipe)")
    plot_tradeoff([(s.model, s.flops_per_image, s.train_seconds, s.final_acc) for s in rows],
                  comp_dir / "tradeoff.png", f"accuracy against cost on {dataset}")
    env = (f"Python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPUs, torch "
           f"{runs[0].info.versions.get('torch') if runs else '?'}")
    lines = [f"# Comparison on {dataset}", "", f"Command: `{settings['command']}`", "",
             f"Environment: {env}. {_settings_text(options)}.", "",
             "| model | params | FLOPs/image | peak memory | time | images/s | final test acc | val acc "
             "(best.pt) | epochs |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        s, epochs = run.summary, run.epochs_trained()[0]
        val = f"{s.chosen_val_acc:.4f}" if s.chosen_val_acc is not None else "-"
        epochs_text = f"{epochs:.2f}" if epochs % 1 else f"{epochs:.0f}"  # 4.44 after a budget's partial epoch
        lines.append(f"| {s.model} | {s.params:,} | {human(s.flops_per_image)} | {s.peak_memory_mb:.0f} MB | "
                     f"{s.train_seconds:.0f}s | {s.images_per_second:.0f} | {s.final_acc:.4f} | {val} | "
                     f"{epochs_text} |")
    missing = [m for m in settings["models"] if m not in {s.model for s in rows}]
    if missing:
        lines += ["", f"Not finished (re-run the command to resume): {', '.join(missing)}."]
    lines += ["", "Time is each run's training and evaluations together; images/s is its training speed. Peak memory "
              "is the training process's peak resident memory on the CPU (max allocated on a GPU).",
              "", "![accuracy](accuracy.png)", "", "![tradeoff](tradeoff.png)", ""]
    lines += [f"- [{s.model}]({s.model}/report.md)" for s in rows]
    write_text_atomic(comp_dir / "report.md", "\n".join(lines) + "\n")
    return comp_dir / "report.md"
