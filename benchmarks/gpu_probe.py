"""Why is our DenseNet-BC-100 training step slower than torchvision's on a GPU? A short probe.

One training step (bf16 autocast, SGD) of moderncnn's and torchvision's DenseNet-BC-100 in channels-last and
NCHW layouts, and of the same network with growth rate 16 (channel counts all multiples of 8, which
tensor-core kernels want; k=12 leaves half the layers at 4 mod 8), timed in this process; then the CUDA
kernels that take the most time in one step of each implementation (torch.profiler).

    python benchmarks/gpu_probe.py [--device cuda] [--batch 512] [--steps 10] [--out probe.txt]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from moderncnn.bench import make_step, measure  # noqa: E402

CONFIGS = [  # (label, implementation, channels_last, extra model kwargs)
    ("moderncnn, channels-last", "moderncnn", True, {}),
    ("moderncnn, NCHW", "moderncnn", False, {"channels_last": False}),
    ("torchvision, channels-last", "torchvision", True, {}),
    ("torchvision, NCHW", "torchvision", False, {}),
    ("moderncnn k=16, channels-last", "moderncnn", True, {"growth_rate": 16}),
]


def step_rate(impl: str, channels_last: bool, kwargs: dict, device: str, batch: int, steps: int) -> float:
    return measure(impl, "densenet_bc_100", "train", (3, 32, 32), batch, device, steps=steps, warmup=3,
                   amp=device != "cpu", channels_last=channels_last, repeats=2,
                   model_kwargs=kwargs)["images_per_second"]


def kernel_table(impl: str, device: str, batch: int, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile
    step = make_step(impl, "densenet_bc_100", "train", (3, 32, 32), batch, device, amp=device != "cpu",
                     channels_last=True)
    for _ in range(3):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    lines = [f"densenet_bc_100 training step, batch {args.batch}, 3x32x32, "
             f"{'bf16 autocast' if args.device != 'cpu' else 'fp32'}, device {args.device}"
             + (f" ({torch.cuda.get_device_name(0)})" if args.device == "cuda" else "")]
    base = None
    for label, impl, channels_last, kwargs in CONFIGS:
        rate = step_rate(impl, channels_last, kwargs, args.device, args.batch, args.steps)
        base = base or rate
        lines.append(f"  {label:32s} {rate:9.0f} img/s  {rate / base:5.2f}x")
        print(lines[-1], flush=True)
    for impl in ("moderncnn", "torchvision"):
        lines.append(f"\n== {impl}: top kernels over two steps (channels-last)\n"
                     + kernel_table(impl, args.device, args.batch))
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
