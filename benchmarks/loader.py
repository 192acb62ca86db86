"""Loader throughput: moderncnn's in-memory loader against torchvision's FashionMNIST + DataLoader with the
same per-sample random crop (padding 4) and horizontal flip, one training epoch each, in the same run.

    python benchmarks/loader.py [--batch-size 128] [--epochs 1]

Prints images/s per configuration and the ratio to torchvision with num_workers=0.
"""
import argparse
import gzip
import shutil
import tempfile
import time
from pathlib import Path

import torch


def ours(batch_size: int, epochs: int) -> float:
    from moderncnn.data import Loader, load_dataset
    train = load_dataset("fashion-mnist")
    loader = Loader(train, batch_size, train=True, augment="crop+flip", seed=0)
    start, n = time.perf_counter(), 0
    for _ in range(epochs):
        for x, y in loader:
            n += len(y)
    return n / (time.perf_counter() - start)


def theirs(batch_size: int, epochs: int, workers: int, root: Path) -> float:
    import torchvision.transforms as T
    from torchvision.datasets import FashionMNIST
    tf = T.Compose([T.RandomCrop(28, padding=4, padding_mode="reflect"), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.2860,), (0.3530,))])
    data = FashionMNIST(str(root), train=True, transform=tf)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=False)
    start, n = time.perf_counter(), 0
    for _ in range(epochs):
        for x, y in loader:
            n += len(y)
    return n / (time.perf_counter() - start)


def torchvision_root(tmp: Path) -> Path:
    """torchvision expects <root>/FashionMNIST/raw/<unzipped IDX files>; build it from the Debian files."""
    from moderncnn.data.datasets import search_paths
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    source = next(p for p in search_paths("fashion-mnist") if (p / "train-images-idx3-ubyte.gz").exists())
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        with gzip.open(source / f"{name}.gz") as src, open(raw / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return tmp


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = torchvision_root(Path(tmp))
        results = {"moderncnn Loader (crop+flip per batch)": ours(args.batch_size, args.epochs)}
        for workers in (0, 2):
            results[f"torchvision DataLoader, num_workers={workers}"] = theirs(args.batch_size, args.epochs, workers,
                                                                              root)
    base = results["torchvision DataLoader, num_workers=0"]
    print(f"Fashion-MNIST train, batch {args.batch_size}, {args.epochs} epoch(s), crop(pad 4)+flip, CPU")
    for name, rate in results.items():
        print(f"  {name:42s} {rate:12,.0f} img/s   {rate / base:7.1f}x")


if __name__ == "__main__":
    main()
