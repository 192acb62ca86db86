"""Follow a training config through the code: which files it visits, from ``moderncnn.train`` to the first
``train_one_epoch``, and how many times each.

    python benchmarks/config_trace.py [--json out.json]

A frame "has the config" when one of its arguments is the run's ``TrainConfig`` (or the resolved config that
wraps it), or an object holding one in an attribute (the setup, a callback). The frames that have it, in call
order, form a path through the source files; a visit to a file is a stay in it, so a file entered, left for
another and entered again counts twice. The run is one step of the default model on 64 generated images.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", 32), ("test", 8)):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _holds_config(value, config_types) -> bool:
    if isinstance(value, config_types):
        return True
    attrs = getattr(value, "__dict__", None)
    if isinstance(attrs, dict):
        return any(isinstance(v, config_types) for v in attrs.values())
    return False


def trace_config_path(data_dir: Path, out: Path) -> list:
    import moderncnn
    from moderncnn.runs import TrainConfig
    config_types = (TrainConfig,)
    try:
        from moderncnn.training.resolve import ResolvedConfig
        config_types += (ResolvedConfig,)
    except ImportError:  # before the resolved config existed
        pass
    src = str(Path(moderncnn.__file__).parent)
    path, done = [], []

    def profile(frame, event, arg):
        if event != "call" or done:
            return
        code = frame.f_code
        if not code.co_filename.startswith(src):
            return
        args = [frame.f_locals.get(n) for n in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]]
        if any(_holds_config(a, config_types) for a in args):
            path.append((str(Path(code.co_filename).relative_to(src)), code.co_name))
        if code.co_name == "train_one_epoch":
            done.append(True)

    sys.setprofile(profile)
    try:
        moderncnn.train(model="densenet_bc_fmnist", dataset="imagefolder", data_dir=str(data_dir), epochs=1,
                        batch_size=64, out=str(out), progress=False, quiet=True, amp="off", device="cpu")
    finally:
        sys.setprofile(None)
    return path


def visits(path: list) -> collections.Counter:
    """Stays per file: consecutive frames in one file are one stay."""
    counts, previous = collections.Counter(), None
    for filename, _ in path:
        if filename != previous:
            counts[filename] += 1
        previous = filename
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the path and the counts here")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = trace_config_path(make_folder(Path(tmp) / "data"), Path(tmp) / "runs")
    counts = visits(path)
    print(f"{sum(counts.values())} stays in {len(counts)} files, {len(path)} frames holding the config")
    for filename, n in counts.most_common():
        print(f"{n:3d}  {filename}")
    if args.json:
        Path(args.json).write_text(json.dumps({"path": path, "visits": dict(counts)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
