"""Image folders, measured in one run: decoding with one process against all cores, the loader reading
from the disk cache against memory, and the peak RSS of a training run whose data is memory-mapped.

    python benchmarks/imagefolder.py --cifar /tmp/cifar10-jpg            # the CIFAR-10 JPEG copy, extracted
    python benchmarks/imagefolder.py --cifar /tmp/cifar10-jpg --rss 22000  # plus the capped run (22,000 images)

Each decode writes a fresh cache in a temporary directory. The loader is timed with the page cache warm
(the disk run right after the memory run, the same epoch, the same augmentation). The capped run trains
on a synthetic folder of 128x128 JPEGs whose decoded cache is at least four times the 256 MB data cap;
its peak RSS is compared with the same command, for as many steps, on a tiny folder (the model's own
footprint). Both pairs run twice: with glibc's mmap threshold pinned at its 128 KiB default (RSS then
follows live memory; bench.py's convention), and as a user runs them, with no environment variable.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from moderncnn.data import Loader, load_dataset

CAP_MB = 256


def decode(root: Path, workers: int, cache_root: Path) -> float:
    start = time.perf_counter()
    load_dataset("imagefolder", root=str(root), split="train", workers=workers, cache_root=str(cache_root))
    return time.perf_counter() - start


def loader_epoch(dataset, batch: int = 512) -> float:
    loader = Loader(dataset, batch, augment="crop+flip", seed=0, mean=[0.5] * 3, std=[0.25] * 3)
    start = time.perf_counter()
    for x, _ in loader.iterate(0):
        x.sum()  # touch the batch
    return len(loader) * batch / (time.perf_counter() - start)


def synthetic_folder(root: Path, n: int, side: int = 128, classes: int = 10) -> Path:
    from PIL import Image
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (classes, side, side, 3), dtype=np.uint8)
    for split, count in (("train", n), ("test", max(classes, n // 10))):
        for i in range(count):
            label = i % classes
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            noise = rng.integers(0, 40, (side, side, 3), dtype=np.uint8)
            Image.fromarray(base[label] // 2 + noise).save(folder / f"{i}.jpg", quality=90)
    return root


def capped_run(root: Path, out: Path, name: str, epochs: int, pin_malloc: bool) -> float:
    """Peak RSS (MB) of a training run memory-mapping ``root``'s cache (built beforehand)."""
    cmd = [sys.executable, "-m", "moderncnn", "train", "--dataset", "imagefolder", "--data-dir", str(root),
           "--data-cache", "disk", "--model", "densenet_bc_fmnist", "--model-arg", "stem_stride=4", "--epochs",
           str(epochs), "--batch-size", "128", "--out", str(out), "--name", name, "--quiet"]
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if pin_malloc else {}))
    subprocess.run(cmd, check=True, env=env)
    return json.loads((out / name / "summary.json").read_text())["peak_memory_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar", type=Path, help="the extracted CIFAR-10 JPEG copy (train/, test/)")
    parser.add_argument("--rss", type=int, default=0, help="images of the capped run's synthetic folder (0: skip)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"{torch.get_num_threads()} threads, {cores} cores")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.cifar:
            one, many = decode(args.cifar, 1, tmp / "c1"), decode(args.cifar, cores, tmp / "cn")
            n = 50_000
            print(f"decode CIFAR-10 train ({n:,} JPEGs): 1 process {n / one:,.0f} img/s ({one:.1f} s), "
                  f"{cores} processes {n / many:,.0f} img/s ({many:.1f} s): {one / many:.2f}x")
            memory = load_dataset("imagefolder", root=str(args.cifar), cache="memory", cache_root=str(tmp / "cn"))
            disk = load_dataset("imagefolder", root=str(args.cifar), cache="disk", cache_root=str(tmp / "cn"))
            loader_epoch(disk)  # warm the page cache
            mem_rate, disk_rate = loader_epoch(memory), loader_epoch(disk)
            print(f"loader, batch 512, crop+flip: memory {mem_rate:,.0f} img/s, disk cache {disk_rate:,.0f} img/s: "
                  f"{disk_rate / mem_rate:.2f}x")
        if args.rss:
            os.environ["MODERNCNN_CACHE"] = str(tmp / "cache")
            big = synthetic_folder(tmp / "big", args.rss)
            tiny = synthetic_folder(tmp / "tiny", 256)
            for root in (big, tiny):
                load_dataset("imagefolder", root=str(root), cache="disk")  # the cache, built before the runs
            cache_mb = args.rss * 3 * 128 * 128 / 2 ** 20
            steps = args.rss // 128
            for pin in (True, False):
                label = "glibc mmap threshold pinned" if pin else "no environment variable"
                big_rss = capped_run(big, tmp / "runs", f"big-{pin}", 1, pin)
                tiny_rss = capped_run(tiny, tmp / "runs", f"tiny-{pin}", -(-steps // 2), pin)  # 2 steps an epoch
                print(f"capped run ({label}): cache {cache_mb:,.0f} MB ({cache_mb / CAP_MB:.1f}x the {CAP_MB} MB "
                      f"cap); peak RSS {big_rss:,.0f} MB, tiny folder for as many steps (the model's footprint) "
                      f"{tiny_rss:,.0f} MB; difference {big_rss - tiny_rss:,.0f} MB against the {CAP_MB} MB cap")


if __name__ == "__main__":
    main()
