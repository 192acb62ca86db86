"""CIFAR-10 speed runs over many seeds: the ``cifar10-speedrun`` recipe through the ordinary trainer.

Each seed is one ``moderncnn.train`` run (resume, signals, budget and report as for any run) with 5,000
training images held out for validation (``--val-split``; tune on these); the test set is scored once, at the end. The script prints each
run's wall time (from the call to the report, data decode excluded once the folder is cached), validation
and test accuracy, then their means and standard deviations, the CPU model and whether it has bfloat16 in
hardware::

    tar xzf cifar10-jpg.tar.gz -C /data        # DIR/train/<class>/*.jpg, DIR/test/<class>/*.jpg
    python benchmarks/cifar_speedrun.py --data-dir /data/cifar10-jpg --runs 5
    python benchmarks/cifar_speedrun.py --data-dir /data/cifar10-jpg --runs 5 --budget 10m
    # a CPU without bfloat16: a quarter of the FLOPs fits more epochs in a budget
    python benchmarks/cifar_speedrun.py --data-dir /data/cifar10-jpg --runs 5 --budget 12m \
        -- --model-arg widths=32,128,128

Any other ``moderncnn train`` flag after ``--`` is passed to every run (``-- --epochs 10 --batch-size 500``).

``--vs-anchor`` runs airbench94_muon's own method beside it, on the same CPU: the anchor script
(``--anchor-script``; it reads airbench from the git directory in ``AIRBENCH_GIT``) for the same seeds,
interleaved (anchor, ours, anchor, ours, ...), so that both meet the same machine load. Each anchor run is one
fresh process started with ``SEED`` and ``RUNS=1`` in its environment; its last line of output is JSON with
``accuracy`` and ``train_seconds`` lists. The script then prints both sides' means, the training-time ratio
(ours / anchor) and the accuracy difference::

    AIRBENCH_GIT=<git dir> python benchmarks/cifar_speedrun.py --data-dir /data/cifar10-jpg --runs 5 \
        --vs-anchor --anchor-script ../shared/tools/anchor_airbench_cpu.py --json side_by_side.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from moderncnn.runs import load_run
from moderncnn.training.budget import parse_budget


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo's, with family and model numbers where the name is generic)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines() if ":" in line)
    except OSError:
        return platform.processor() or platform.machine()
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = fields.get("model name", platform.machine())
    return f"{name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def train_flags(extra) -> tuple:
    """(options, the fields they set) from ``moderncnn train`` flags, parsed as the CLI parses them."""
    from moderncnn.cli import add_train_arguments, config_from_args

    parser = argparse.ArgumentParser(prog="cifar_speedrun.py ... --", allow_abbrev=False)
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(extra))


def speedrun(seed: int, args, extra) -> dict:
    import moderncnn

    values, explicit = train_flags(extra)
    values.update(recipe="cifar10-speedrun", dataset="imagefolder", data_dir=str(args.data_dir),
                  val_split=args.val_split or None, seed=seed, out=str(args.out), name=f"{args.name_prefix}seed{seed}",
                  progress=False, quiet=True)
    if args.budget:
        values["budget"] = args.budget
    start = time.perf_counter()
    result = moderncnn.train(values, explicit=explicit | set(values))
    wall = time.perf_counter() - start
    return dict(seed=seed, wall_s=round(wall, 1), train_s=round(result.train_seconds, 1),
                epochs=round(load_run(result.run_dir).epochs_trained()[0], 2),  # as the run's report counts them
                val_acc=result.val_acc, test_acc=result.final_acc, run_dir=str(result.run_dir))


def anchor_run(seed: int, args) -> dict:
    """One run of the anchor script in a fresh process; its last line of output is its JSON result."""
    env = dict(os.environ, SEED=str(seed), RUNS="1")
    if args.anchor_dir:
        env["ANCHOR_DIR"] = str(args.anchor_dir)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(args.anchor_script)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"cifar_speedrun.py: the anchor run of seed {seed} failed (exit {proc.returncode}): "
                         f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    try:
        result = json.loads(lines[-1])
        accuracy, train_s = float(result["accuracy"][0]), float(result["train_seconds"][0])
    except (ValueError, KeyError, IndexError, TypeError):
        raise SystemExit(f"cifar_speedrun.py: the anchor's last line is not its JSON result: {lines[-1][:200]}")
    return dict(seed=seed, wall_s=round(wall, 3), train_s=round(train_s, 1), test_acc=accuracy,
                bf16=result.get("bf16"))


def side_by_side(anchor: list, ours: list) -> dict:
    """The means of both sides, the time ratios (ours / anchor) and the accuracy difference (points)."""
    def mean(rows, key):
        return statistics.mean(r[key] for r in rows)
    summary = {side: {key: mean(rows, key) for key in ("train_s", "wall_s", "test_acc")}
               for side, rows in (("anchor", anchor), ("moderncnn", ours))}
    summary["train_time_ratio"] = summary["moderncnn"]["train_s"] / summary["anchor"]["train_s"]
    summary["wall_time_ratio"] = summary["moderncnn"]["wall_s"] / summary["anchor"]["wall_s"]
    summary["accuracy_difference_points"] = 100 * (summary["moderncnn"]["test_acc"] - summary["anchor"]["test_acc"])
    return summary


def print_row(who: str, row: dict) -> None:
    val = f"{100 * row['val_acc']:.2f}%" if row.get("val_acc") is not None else "-"
    epochs = f"{row['epochs']:.2f}" if "epochs" in row else "-"
    print(f"{who:>9}  {row['seed']:>4}  {epochs:>6}  {row['wall_s']:>7.1f}  {row['train_s']:>7.1f}  {val:>8}  "
          f"{100 * row['test_acc']:.2f}%", flush=True)


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f}% ± {100 * std:.2f}"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True, help="CIFAR-10 as image folders (train/, test/)")
    parser.add_argument("--runs", type=int, default=5, help="number of seeds (0, 1, ..., N-1)")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--budget", default=None, type=parse_budget,
                        help="time budget of each run (e.g. 10m); default: the recipe's epochs")
    parser.add_argument("--val-split", type=int, default=5000,
                        help="training images held out for validation (tune on these, never on the test set; 0: none, "
                             "all 50,000 train, as the anchor does)")
    parser.add_argument("--name-prefix", default="", help="prefix of the run directories' names")
    parser.add_argument("--out", type=Path, default=Path("runs/speedrun"), help="parent of the run directories")
    parser.add_argument("--json", type=Path, help="also write the table and means to this JSON file")
    parser.add_argument("--vs-anchor", action="store_true",
                        help="run the anchor script for the same seeds, interleaved, and print the ratios")
    parser.add_argument("--anchor-script", type=Path, help="the anchor (e.g. ../shared/tools/anchor_airbench_cpu.py)")
    parser.add_argument("--anchor-dir", type=Path,
                        help="the anchor's data cache (ANCHOR_DIR), kept between its runs; default: its own")
    args = parser.parse_args(argv)

    if args.vs_anchor and not args.anchor_script:
        parser.error("--vs-anchor needs --anchor-script (and AIRBENCH_GIT for airbench's own script)")

    import torch
    from moderncnn.hardware import cpu_has_native_bf16

    native = cpu_has_native_bf16()
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; bfloat16 in hardware: "
          f"{'yes (bf16 autocast)' if native else 'no (float32)'}; torch {torch.__version__}")
    print(f"{'':>9}  {'seed':>4}  {'epochs':>6}  {'wall s':>7}  {'train s':>7}  {'val acc':>8}  {'test acc':>8}")
    rows, anchor_rows = [], []
    for seed in range(args.first_seed, args.first_seed + args.runs):
        if args.vs_anchor:
            anchor_rows.append(anchor_run(seed, args))
            print_row("anchor", anchor_rows[-1])
        rows.append(speedrun(seed, args, extra))
        print_row("moderncnn", rows[-1])
    walls = [r["wall_s"] for r in rows]
    print(f"mean over {len(rows)} runs: wall {statistics.mean(walls):.0f} s, validation "
          f"{mean_std(r['val_acc'] for r in rows)}, test {mean_std(r['test_acc'] for r in rows)}")
    record = dict(cpu=cpu_model(), native_bf16=native, torch=torch.__version__, budget=args.budget, extra=extra,
                  runs=rows)
    if args.vs_anchor:
        summary = side_by_side(anchor_rows, rows)
        print(f"anchor mean over {len(anchor_rows)} runs: wall {summary['anchor']['wall_s']:.0f} s, training "
              f"{summary['anchor']['train_s']:.0f} s, test {mean_std(r['test_acc'] for r in anchor_rows)}")
        print(f"moderncnn / anchor: training time {summary['train_time_ratio']:.2f}x, wall time "
              f"{summary['wall_time_ratio']:.2f}x; test accuracy {summary['accuracy_difference_points']:+.2f} "
              f"points")
        record.update(anchor_runs=anchor_rows, anchor_script=str(args.anchor_script), **summary)
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
