"""Inference latency and parity of the exported formats against eager PyTorch, side by side in one process:
eager eval (BatchNorm as trained), the torch.export program (.pt2), the AOTInductor package (.aoti.pt2), ONNX
Runtime, safetensors weights loaded back into the model, and TorchScript, at batch 1 and batch 128; best of
interleaved rounds. Parity is the largest absolute difference of any logit from eager's, over both batches.

    python benchmarks/export_latency.py [--model densenet_bc_fmnist] [--rounds 5]
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

import moderncnn
from moderncnn.export import FORMATS, export_model, load_exported


def _timed(fn, x, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet_bc_fmnist")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = moderncnn.create_model(args.model, num_classes=10, in_chans=1)
    size = model.default_input_size
    model.train()
    with torch.no_grad():
        model(torch.randn(8, *size))  # running statistics of their own
    model.eval()
    work = Path(tempfile.mkdtemp())
    runners = {"eager": model}
    for fmt in ("pt2", "aoti", "safetensors", "torchscript"):
        start = time.perf_counter()
        path = export_model(model, work / f"m{FORMATS[fmt]}", fmt, size)
        print(f"export {fmt}: {time.perf_counter() - start:.1f} s", flush=True)
        runners[fmt] = load_exported(path)
    import onnxruntime as ort
    path = export_model(model, work / "m.onnx", "onnx", size)
    runtime = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    runners["onnxruntime"] = lambda x: runtime.run(None, {"images": x.numpy()})[0]
    print(f"{args.model}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}")
    parity = {name: 0.0 for name in runners}
    for batch, repeats in ((1, 50), (128, 3)):
        x = torch.randn(batch, *size)
        best = {name: float("inf") for name in runners}
        with torch.no_grad():
            for fn in runners.values():
                fn(x)  # warm-up
            for _ in range(args.rounds):
                for name, fn in runners.items():
                    best[name] = min(best[name], _timed(fn, x, repeats))
        line = "  ".join(f"{name} {seconds * 1000:.2f} ms ({best['eager'] / seconds:.2f}x)"
                         for name, seconds in best.items())
        print(f"batch {batch:3d}: {line}", flush=True)
        with torch.no_grad():
            expected = model(x)
            for name, fn in runners.items():
                parity[name] = max(parity[name], (torch.as_tensor(fn(x)) - expected).abs().max().item())
    print("max |logit - eager|: " + "  ".join(f"{name} {diff:.1e}" for name, diff in parity.items()))


if __name__ == "__main__":
    main()
