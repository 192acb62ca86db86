"""Training-step speed by precision, side by side in one process: float32, bfloat16 autocast, float16 autocast with a
GradScaler, and oneDNN's implicit bfloat16 for float32 models (``torch.backends.mkldnn`` fp32_precision="bf16").

Each model trains channels-last with SGD on random inputs; configurations are interleaved round by round and the
fastest round counts. float16 convolution backward has no fast CPU kernel, so on a CPU it is timed over one step
at a small batch (its images/s is still comparable). With ``--compile``, the bfloat16 step is also measured under
``torch.compile``: the time of the first (compiling) steps and the step time after warm-up.

    python benchmarks/precision.py                       # the four models of the precision table
    python benchmarks/precision.py --compile --models densenet_bc_fmnist,vgg_airbench,densenet121
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time

import torch
from torch import nn

import moderncnn
from moderncnn.bench import make_step as bench_step
from moderncnn.training.precision import cpu_bf16_feature

# name -> (input C x H x W, batch, constructor arguments), as the precision table measures them
MODELS = {
    "densenet_bc_fmnist": ((1, 28, 28), 128, {}),
    "vgg_airbench": ((3, 32, 32), 500, {}),
    "densenet121": ((1, 96, 96), 64, {}),
    "resnet18": ((3, 32, 32), 128, {"small_input": True}),
}


@contextlib.contextmanager
def implicit_bf16(enabled: bool):
    """oneDNN computes float32 convolutions and matrix products in bfloat16 inside (torch >= 2.9)."""
    mkldnn = torch.backends.mkldnn
    backends = [b for b in (getattr(mkldnn, "conv", None), getattr(mkldnn, "matmul", None))
                if b is not None and hasattr(b, "fp32_precision")]
    previous = [b.fp32_precision for b in backends]
    try:
        if enabled:
            for b in backends:
                b.fp32_precision = "bf16"
        yield bool(backends)
    finally:
        for b, value in zip(backends, previous):
            b.fp32_precision = value


def make_step(name: str, mode: str, batch: int, compiled: bool = False):
    """One training step of ``name`` in ``mode`` (fp32, bf16, fp16 or implicit), as ``moderncnn bench`` times it;
    ``compiled``: the bfloat16 step with the model under torch.compile."""
    size, _, kwargs = MODELS[name]
    if compiled:
        return _compiled_step(name, batch)
    amp = {"bf16": "bf16", "fp16": "fp16"}.get(mode, "off")
    step = bench_step("moderncnn", name, "train", size, batch, "cpu", amp=amp, channels_last=True, model_kwargs=kwargs)
    if mode != "implicit":
        return step

    def implicit():
        with implicit_bf16(True):
            step()
    return implicit


def _compiled_step(name: str, batch: int):
    size, _, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = moderncnn.create_model(name, num_classes=10, in_chans=size[0], **kwargs)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, *size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    net = torch.compile(model.train())

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def timed(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def precision_table(models, rounds: int, steps: int) -> dict:
    results = {}
    for name in models:
        batch = MODELS[name][1]
        steps_of = {"fp32": make_step(name, "fp32", batch), "bf16": make_step(name, "bf16", batch),
                    "implicit": make_step(name, "implicit", batch)}
        with implicit_bf16(True) as available:
            pass
        if not available:
            del steps_of["implicit"]
        for step in steps_of.values():
            step()  # warm-up: oneDNN's kernels chosen, buffers allocated
        best = {mode: float("inf") for mode in steps_of}
        for _ in range(rounds):
            for mode, step in steps_of.items():
                best[mode] = min(best[mode], timed(step, steps))
        row = {mode: batch / seconds for mode, seconds in best.items()}
        small = min(batch, 16)
        fp16 = make_step(name, "fp16", small)
        fp16()
        row["fp16"] = small / timed(fp16, 1)
        results[name] = row
        ratios = "  ".join(f"{mode} {ips:8.1f} img/s ({ips / row['fp32']:.2f}x)" for mode, ips in row.items())
        print(f"{name:20s} batch {batch:4d}  {ratios}", flush=True)
    return results


def compile_table(models, steps: int) -> dict:
    results = {}
    for name in models:
        batch = MODELS[name][1]
        eager = make_step(name, "bf16", batch)
        eager()
        start = time.perf_counter()
        compiled = make_step(name, "bf16", batch, compiled=True)
        compiled()
        compiled()
        compile_seconds = time.perf_counter() - start
        eager_s, compiled_s = min(timed(eager, steps) for _ in range(3)), min(timed(compiled, steps) for _ in range(3))
        results[name] = {"eager_step_s": eager_s, "compiled_step_s": compiled_s, "compile_s": compile_seconds}
        print(f"{name:20s} bf16 step: eager {eager_s * 1000:7.1f} ms, compiled {compiled_s * 1000:7.1f} ms "
              f"({eager_s / compiled_s:.2f}x); first two compiled steps {compile_seconds:.1f} s; pays for itself "
              f"after {compile_seconds / max(eager_s - compiled_s, 1e-9):.0f} steps" if compiled_s < eager_s else
              f"{name:20s} bf16 step: eager {eager_s * 1000:7.1f} ms, compiled {compiled_s * 1000:7.1f} ms "
              f"({eager_s / compiled_s:.2f}x, no gain); first two compiled steps {compile_seconds:.1f} s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="measure torch.compile under bf16 instead")
    parser.add_argument("--json", default=None, help="write the figures to this file")
    args = parser.parse_args()
    feature = cpu_bf16_feature()
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; native bfloat16: {feature or 'no (emulated)'}", flush=True)
    models = args.models.split(",")
    results = compile_table(models, args.steps) if args.compile else precision_table(models, args.rounds, args.steps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"native_bf16": feature, "torch": torch.__version__, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
