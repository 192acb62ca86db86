"""The speed run's step, lever by lever: images/s of the ``cifar10-speedrun`` recipe's real training path
(loader, augmentation, autocast, Muon) on the CIFAR-10 image folders, and the loader's share of it.

    python benchmarks/speedrun_levers.py --data-dir /data/cifar10-jpg [--images 12000] [--json out.json]

Each configuration is one short ``moderncnn.train`` run of one epoch over ``--images`` training images (no
evaluation counted: images/s is the epoch's training throughput), interleaved round by round, the fastest round
kept. The loader row iterates the training loader alone (the same batches and augmentation, no model).
Configurations: the recipe as it is; batch sizes 500 and 2000; training at 28x28 and 24x24 (what progressive
resizing buys per epoch spent small); ``--compile``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

CONFIGS = {  # label -> moderncnn.train overrides
    "recipe (batch 1000, 32x32)": {},
    "batch 500": {"batch_size": 500},
    "batch 2000": {"batch_size": 2000},
    "28x28 (progressive size)": {"progressive_size": 28, "progressive_fraction": 1.0},
    "24x24 (progressive size)": {"progressive_size": 24, "progressive_fraction": 1.0},
    "torch.compile": {"compile": True},
}


def train_throughput(data_dir: Path, images: int, overrides: dict, out: Path) -> float:
    import moderncnn
    from moderncnn.runs import load_run
    values = dict(recipe="cifar10-speedrun", dataset="imagefolder", data_dir=str(data_dir), subset=images,
                  epochs=1, tta=0, progress=False, quiet=True, out=str(out), name=f"r{time.monotonic_ns()}")
    values.update(overrides)  # a progressive size with fraction 1 trains the one epoch at that size
    result = moderncnn.train(**values)
    return load_run(result.run_dir).history[0].images_per_second


def loader_throughput(data_dir: Path, images: int, batch_size: int = 1000) -> float:
    from moderncnn.data import Loader, load_dataset
    train = load_dataset("imagefolder", root=str(data_dir), split="train")
    train = train.subset(images)
    # the recipe's augmentation and layout; any mean and std cost the same
    loader = Loader(train, batch_size, train=True, augment="crop2+altflip", channels_last=True, seed=0,
                    mean=[0.5] * 3, std=[0.25] * 3)
    start, seen = time.perf_counter(), 0
    for x, y in loader.iterate(0):
        seen += len(y)
        if seen >= images:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--images", type=int, default=12000, help="training images per measured epoch")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip", default="", help="comma-separated labels to leave out")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    configs = {k: v for k, v in CONFIGS.items() if k not in skip}
    best = {label: 0.0 for label in [*configs, "loader alone"]}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for label, overrides in configs.items():
                best[label] = max(best[label], train_throughput(args.data_dir, args.images, overrides, Path(tmp)))
                print(f"round {round_ + 1}: {label:32s} {best[label]:8.1f} img/s", flush=True)
            best["loader alone"] = max(best["loader alone"], loader_throughput(args.data_dir, args.images))
    base = best["recipe (batch 1000, 32x32)"] or 1.0
    print(f"\n{'configuration':34s} {'img/s':>8s}  vs recipe")
    for label, rate in best.items():
        print(f"{label:34s} {rate:8.1f}  {rate / base:5.2f}x")
    print(f"the loader's share of the recipe's step: {base / best['loader alone']:.1%}")
    if args.json:
        args.json.write_text(json.dumps(best, indent=2) + "\n")


if __name__ == "__main__":
    main()
