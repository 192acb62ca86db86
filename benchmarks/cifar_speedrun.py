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
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

from moderncnn.runs import load_run
from moderncnn.train.budget import parse_budget


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
                  val_split=args.val_split, seed=seed, out=str(args.out), name=f"{args.name_prefix}seed{seed}",
                  progress=False, quiet=True)
    if args.budget:
        values["budget"] = args.budget
    start = time.perf_counter()
    result = moderncnn.train(values, explicit=explicit | set(values))
    wall = time.perf_counter() - start
    return dict(seed=seed, wall_s=round(wall, 1), train_s=round(result.train_seconds, 1),
                epochs=round(load_run(result.run_dir).epochs_trained()[0], 2),  # as the run's report counts them
                val_acc=result.val_acc, test_acc=result.final_acc, run_dir=str(result.run_dir))


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
                        help="training images held out for validation (tune on these, never on the test set)")
    parser.add_argument("--name-prefix", default="", help="prefix of the run directories' names")
    parser.add_argument("--out", type=Path, default=Path("runs/speedrun"), help="parent of the run directories")
    parser.add_argument("--json", type=Path, help="also write the table and means to this JSON file")
    args = parser.parse_args(argv)

    import torch
    from moderncnn.train.precision import cpu_has_native_bf16

    native = cpu_has_native_bf16()
    print(f"CPU: {cpu_model()}, {torch.get_num_threads()} threads; bfloat16 in hardware: "
          f"{'yes (bf16 autocast)' if native else 'no (float32)'}; torch {torch.__version__}")
    print(f"{'seed':>4}  {'epochs':>6}  {'wall s':>7}  {'train s':>7}  {'val acc':>8}  {'test acc':>8}")
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.runs):
        row = speedrun(seed, args, extra)
        rows.append(row)
        val = f"{100 * row['val_acc']:.2f}%" if row["val_acc"] is not None else "-"
        print(f"{seed:>4}  {row['epochs']:>6.2f}  {row['wall_s']:>7.1f}  {row['train_s']:>7.1f}  {val:>8}  "
              f"{100 * row['test_acc']:.2f}%", flush=True)
    walls = [r["wall_s"] for r in rows]
    print(f"mean over {len(rows)} runs: wall {statistics.mean(walls):.0f} s, validation "
          f"{mean_std(r['val_acc'] for r in rows)}, test {mean_std(r['test_acc'] for r in rows)}")
    if args.json:
        args.json.write_text(json.dumps(dict(cpu=cpu_model(), native_bf16=native, torch=torch.__version__,
                                             budget=args.budget, extra=extra, runs=rows), indent=1))


if __name__ == "__main__":
    main()
