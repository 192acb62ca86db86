"""Fine-tune a pretrained network on a folder of your own images, then predict, with the command line.

    python examples/finetune_folder.py                          # a generated folder and a stand-in weights file
    python examples/finetune_folder.py --weights resnet18.pth   # torchvision's ImageNet weights, saved locally
    python examples/finetune_folder.py --data-dir photos/       # your own DIR/train/<class>/*, DIR/test/<class>/*

Without ``--data-dir`` it writes a small folder of two classes (reddish and bluish noise). Without
``--weights`` it saves a randomly initialised torchvision ResNet-18 as the "pretrained" file, so that the
example runs offline; with random features the frozen backbone learns little, and with the real ImageNet
weights (``torchvision.models.resnet18(weights="DEFAULT").state_dict()`` saved with ``torch.save``, or plain
``--pretrained`` where the machine can download) the same commands fine-tune a useful classifier.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(root: Path, per_class: int = 12, size: int = 40, seed: int = 0) -> Path:
    """root/{train,test}/{red,blue}/*.jpg: noise images tinted by their class."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", max(2, per_class // 3))):
        for cls, channel in (("red", 0), ("blue", 2)):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (size, size, 3), dtype=np.uint8)
                pixels[..., channel] += 120
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def stand_in_weights(path: Path) -> Path:
    """torchvision's ResNet-18 with its random initialisation, saved as a state dict."""
    import torch
    import torchvision

    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def moderncnn(*args: str) -> str:
    """Run ``moderncnn ARGS`` as a user would, echo the command and its output, and return the output."""
    command = [sys.executable, "-m", "moderncnn", *args]
    print("$ moderncnn " + " ".join(shlex.quote(a) for a in args), flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    print(done.stdout + done.stderr, end="", flush=True)
    if done.returncode:
        raise SystemExit(f"moderncnn {args[0]} failed with exit code {done.returncode}")
    return done.stdout


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="an image folder (default: generate one under --work)")
    parser.add_argument("--weights", type=Path, help="a local state-dict file of the model's ImageNet weights")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--work", type=Path, default=Path("finetune-example"), help="where files are written")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32, help="training side (ImageNet weights: 224)")
    args = parser.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    data = args.data_dir or make_folder(args.work / "photos")
    weights = args.weights or stand_in_weights(args.work / f"{args.model}-stand-in.pth")
    run = args.work / "runs" / "finetuned"
    if run.exists():  # this example's own run from an earlier call: start afresh
        shutil.rmtree(run)
    moderncnn("train", "--dataset", "imagefolder", "--data-dir", str(data), "--model", args.model,
              "--pretrained", str(weights), "--freeze-backbone", "--epochs", str(args.epochs), "--batch-size", "8",
              "--image-size", str(args.image_size), "--no-progress", "--out", str(run.parent), "--name", run.name)
    test_images = sorted(p for p in (Path(data) / "test").rglob("*") if p.is_file())[:4]
    moderncnn("predict", str(run), *map(str, test_images), "--top-k", "2")
    print(f"the run's report: {run / 'report.md'}")


if __name__ == "__main__":
    main()
