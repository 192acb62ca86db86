"""Selective test-time augmentation on a trained run: the final evaluation's accuracy and seconds when only the
images whose plain top probability is under a threshold get the TTA views.

    python benchmarks/selective_tta.py RUN [--split val] [--thresholds 1,0.9,0.8,0.7,0.6,0.5] [--rounds 2]
        [--json out.json]

RUN is a finished run directory (its evaluation checkpoint is scored on its own test split, or with ``--split
val`` on the validation images it held out, preprocessed as in training, under the precision it trained in):
choose the threshold on validation. Rows: no TTA, then the run's TTA level (2 unless ``--level``)
for every image (threshold 1) and for the images under each threshold. Each row is timed ``--rounds`` times,
interleaved, and its fastest round kept; the share of images that got the views is counted.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _setup(run_dir: Path, batch_size: int, split: str):
    import torch
    from moderncnn.data import Loader, load_dataset
    from moderncnn.runs import ModelSpec, build_model, load_run, read_checkpoint, resolve_checkpoint
    from moderncnn.training.precision import resolve_precision
    run = load_run(run_dir)
    state = read_checkpoint(resolve_checkpoint(str(run_dir)))
    spec, cfg = ModelSpec.from_dict(state), run.config
    kwargs = {}
    if cfg.dataset == "imagefolder":
        kwargs = dict(image_size=tuple(spec.native_size or (spec.image_size, spec.image_size)),
                      val_fraction=cfg.val_fraction, seed=cfg.seed, channels=spec.in_chans, resize=spec.resize)
    if split == "val":
        if not cfg.val_split:
            raise SystemExit(f"{run_dir} held out no validation images (--val-split)")
        train = load_dataset(cfg.dataset, root=cfg.data_dir, split="train", **kwargs)
        test = train.split_validation(cfg.val_split, seed=cfg.seed)[1]  # as the run held them out
    else:
        test = load_dataset(cfg.dataset, root=cfg.data_dir, split="test", **kwargs)
    loader = Loader(test, batch_size, train=False, image_size=spec.image_size, device=torch.device("cpu"),
                    mean=spec.mean, std=spec.std, eval_crop=spec.eval_crop, channels_last=True)
    model = build_model(state, str(run_dir)).to(memory_format=torch.channels_last).eval()
    precision = resolve_precision(cfg.amp, torch.device("cpu"), warn=False)
    return model, loader, precision.dtype, int(cfg.tta or 2)


def _doubtful_share(model, loader, amp_dtype, below: float) -> float:
    import torch
    doubtful = total = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
        for x, _ in loader:
            doubtful += int((model(x).float().softmax(1).amax(1) < below).sum())
            total += len(x)
    return doubtful / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--thresholds", default="1,0.9,0.8,0.7,0.6,0.5")
    p.add_argument("--level", type=int, default=None, help="TTA level (default: the run's, else 2)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    from moderncnn.training.loop import evaluate
    model, loader, amp_dtype, level = _setup(args.run, args.batch_size, args.split)
    level = args.level or level
    rows = [("no TTA", 0, 1.0)] + [(f"TTA {level}, top probability < {t:g}" if t < 1 else f"TTA {level}, every image",
                                    level, t) for t in map(float, args.thresholds.split(","))]
    best = {label: float("inf") for label, *_ in rows}
    accuracy = {}
    for _ in range(args.rounds):
        for label, tta, below in rows:
            start = time.perf_counter()
            _, accuracy[label] = evaluate(model, loader, tta=tta, amp_dtype=amp_dtype, tta_below=below)
            best[label] = min(best[label], time.perf_counter() - start)
    print(f"{args.run}: {len(loader.dataset)} {args.split} images, precision {amp_dtype or 'float32'}")
    print(f"| evaluation | images given the views | seconds | {args.split} acc |\n|---|---:|---:|---:|")
    table = []
    for label, tta, below in rows:
        share = 0.0 if not tta else (1.0 if below >= 1 else _doubtful_share(model, loader, amp_dtype, below))
        table.append(dict(evaluation=label, level=tta, below=below, share=share, seconds=best[label],
                          accuracy=accuracy[label]))
        print(f"| {label} | {share:.1%} | {best[label]:.1f} | {accuracy[label]:.2%} |")
    if args.json:
        args.json.write_text(json.dumps(dict(run=str(args.run), split=args.split, rows=table), indent=2))


if __name__ == "__main__":
    main()
