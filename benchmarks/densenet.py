"""DenseNet speed and memory against torchvision, side by side in one run.

    python benchmarks/densenet.py [--models densenet121,densenet_bc_100,resnet18] [--input 1x96x96]
                                  [--batch 64] [--device cpu|cuda] [--memory-plot]

Prints the table of `moderncnn bench` (train images/s, peak memory, inference images/s and the ratios to
torchvision's same network); with --memory-plot also measures DenseNet-121's peak training memory against
batch size (ours normal / memory-efficient vs torchvision normal / memory-efficient) and saves
docs/img/densenet121_memory.png.
"""
import argparse
from pathlib import Path

from moderncnn.bench import _measure_isolated, measure, run_benchmark
from moderncnn.cli import _parse_size


def memory_curve(input_size, batches, device, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    run = _measure_isolated if device == "cpu" else (lambda a: measure(**a))
    series = {("torchvision", "train"): "torchvision", ("torchvision", "train_me"): "torchvision memory_efficient",
              ("moderncnn", "train"): "moderncnn", ("moderncnn", "train_me"): "moderncnn memory_efficient"}
    results = {label: [] for label in series.values()}
    for batch in batches:
        for (impl, mode), label in series.items():
            r = run(dict(impl=impl, name="densenet121", mode=mode, input_size=list(input_size), batch=batch,
                         device=device, steps=1, warmup=1))
            results[label].append(r["peak_mb"])
            print(f"batch {batch:4d}  {label:30s} peak {r['peak_mb']:8.0f} MB  {r['images_per_second']:7.1f} img/s",
                  flush=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in results.items():
        ax.plot(batches, values, "o-" if "moderncnn" in label else "s--", label=label)
    ax.set_xlabel("batch size")
    ax.set_ylabel("peak memory, MB" + (" (RSS)" if device == "cpu" else " (CUDA allocated)"))
    ax.set_title(f"DenseNet-121 training step, input {'x'.join(map(str, input_size))}, {device}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"saved {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="densenet121,densenet_bc_100,resnet18")
    parser.add_argument("--input", type=_parse_size, default=(1, 96, 96))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval-batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--memory-plot", action="store_true")
    parser.add_argument("--batches", default="16,32,64,128")
    args = parser.parse_args()
    if args.models:
        run_benchmark(args.models.split(","), args.input, args.batch, args.device, args.steps, args.eval_batch,
                      args.amp, args.channels_last, repeats=args.repeats)
    if args.memory_plot:
        memory_curve(args.input, [int(b) for b in args.batches.split(",")], args.device,
                     Path(__file__).parent.parent / "docs" / "img" / "densenet121_memory.png")


if __name__ == "__main__":
    main()
