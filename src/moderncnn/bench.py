"""Side-by-side speed and memory against torchvision's same networks, measured in the same run.

For each model: training images/s (normal mode, and memory-efficient mode for DenseNets), peak memory,
and inference images/s of :func:`optimize_for_inference` against torchvision's ``eval()``. Ratios are ours /
torchvision's, against torchvision as it comes (``vs tv``) and at its best eager setting, channels-last
(``vs tv-CL``). On the CPU every configuration runs in a fresh subprocess, so its peak RSS is its own, and
peak memory is measured twice: with glibc's mmap threshold pinned for both sides (live memory), and as a
plain process runs it (as a user of ``moderncnn train`` sees it; the memory-efficient mode pins the threshold
itself there, as the trainer does). On CUDA the peak is ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .runs import peak_memory_mb

__all__ = ["run_benchmark", "torchvision_counterpart", "has_torchvision_counterpart", "make_step", "measure"]


def has_torchvision_counterpart(name: str) -> bool:
    import torchvision.models as tvm
    return name == "densenet_bc_100" or callable(getattr(tvm, name, None))


def torchvision_counterpart(name: str, num_classes: int, in_chans: int, memory_efficient: bool = False) -> nn.Module:
    """torchvision's implementation of the same network (first convolution adapted to ``in_chans``)."""
    import torchvision.models as tvm
    if name == "densenet_bc_100":  # torchvision's DenseNet class with the CIFAR stem of the paper
        model = tvm.DenseNet(growth_rate=12, block_config=(16, 16, 16), num_init_features=24, bn_size=4,
                             num_classes=num_classes, memory_efficient=memory_efficient)
        model.features.conv0 = nn.Conv2d(in_chans, 24, 3, padding=1, bias=False)
        for attr in ("norm0", "relu0", "pool0"):
            setattr(model.features, attr, nn.Identity())
        return model
    kwargs = {"memory_efficient": memory_efficient} if name.startswith("densenet") else {}
    if name == "googlenet":
        kwargs.update(aux_logits=False, init_weights=True)
    model = getattr(tvm, name)(num_classes=num_classes, **kwargs)
    if in_chans != 3:
        if name.startswith("densenet"):
            old = model.features.conv0
            model.features.conv0 = nn.Conv2d(in_chans, old.out_channels, old.kernel_size, old.stride, old.padding,
                                             bias=False)
        elif name.startswith("resnet"):
            model.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
        else:
            raise ValueError(f"no in_chans adaptation for torchvision's {name}")
    return model


def _build(impl: str, name: str, num_classes: int, in_chans: int, memory_efficient: bool,
           model_kwargs: Optional[Dict] = None) -> nn.Module:
    if impl == "torchvision":
        return torchvision_counterpart(name, num_classes, in_chans, memory_efficient)
    from .models import create_model
    kwargs = dict(model_kwargs or {}, **({"memory_efficient": True} if memory_efficient else {}))
    return create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_AUTOCAST = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _amp_kind(amp) -> str:
    """"off", "bf16" or "fp16" from a benchmark's ``amp`` (True is bf16, as before fp16 existed)."""
    if amp in (None, False, "off"):
        return "off"
    if amp in (True, "bf16"):
        return "bf16"
    if amp == "fp16":
        return "fp16"
    raise ValueError(f"amp must be bf16, fp16 or off, got {amp!r}")


def make_step(impl: str, name: str, mode: str, input_size: Sequence[int], batch: int, device: str = "cpu",
              amp="off", channels_last: bool = False, model_kwargs: Optional[Dict] = None,
              inference: Optional[Dict] = None):
    """One step of a configuration as a function: ``mode`` is "train" (SGD), "train_me" (memory-efficient),
    "eval" or "eval_opt" (:func:`optimize_for_inference`, with the keyword arguments ``inference``);
    ``model_kwargs`` reshape our network (e.g. ``growth_rate=16``). Random inputs, seeded."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes, as in training (which sets it too)
    if dev.type == "cpu" and impl == "moderncnn" and mode == "train_me":
        from .training.malloc import pin_mmap_threshold
        pin_mmap_threshold()  # as `moderncnn train --memory-efficient` does
    torch.manual_seed(0)
    c = input_size[0]
    model = _build(impl, name, 10, c, mode == "train_me", model_kwargs).to(dev)
    x = torch.randn(batch, *input_size, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=fmt)
    dtype = _AUTOCAST[_amp_kind(amp)]
    amp_ctx = lambda: torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    if mode.startswith("train"):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        # float16 trains as the trainer does it: the loss scaled, the step taken by the scaler
        scaler = torch.amp.GradScaler(dev.type) if dtype == torch.float16 else None

        def step():
            with amp_ctx():
                loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
    else:
        model.eval()
        if mode == "eval_opt":
            # it computes in --amp's dtype itself (weights cast, no autocast), like for like with torchvision's
            from .models.inference import optimize_for_inference
            options = {"channels_last": True, "precision": _amp_kind(amp), **(inference or {})}
            model = optimize_for_inference(model, example=x, **options)
            amp_ctx = contextlib.nullcontext

        def step():
            with torch.inference_mode(), amp_ctx():
                model(x)
    step.precision = getattr(model, "precision", _amp_kind(amp))
    return step


def measure(impl: str, name: str, mode: str, input_size: Sequence[int], batch: int, device: str = "cpu",
            steps: int = 5, warmup: int = 2, amp="off", channels_last: bool = False,
            repeats: int = 1, model_kwargs: Optional[Dict] = None, inference: Optional[Dict] = None) -> Dict:
    """One configuration (see :func:`make_step`), timed.

    ``repeats`` rounds of ``steps`` timed steps; the fastest round counts (as timeit does: slower rounds
    measure other processes on a shared machine, not the code)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    step = make_step(impl, name, mode, input_size, batch, device, amp, channels_last, model_kwargs, inference)
    for _ in range(warmup):
        step()
    _sync(dev)
    seconds = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(dev)
        seconds = min(seconds, time.perf_counter() - start)
    result = {"impl": impl, "model": name, "mode": mode, "images_per_second": steps * batch / seconds,
              "batch": batch, "device": str(dev), "precision": step.precision}
    result["peak_mb"] = peak_memory_mb(dev)
    return result


# glibc raises its mmap threshold after large frees and then keeps freed activation buffers in the heap,
# so peak RSS measures allocator history as much as memory use. Memory runs (torchvision's too) pin the
# threshold at its 128 KiB default, so that RSS follows live memory; speed runs leave malloc alone
# (pinning costs page faults on every large allocation).
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _subprocess_measure(args: Dict, pin_malloc: bool) -> Dict:
    import os
    cmd = [sys.executable, "-c", "import json,sys; from moderncnn.bench import measure; "
           "print(json.dumps(measure(**json.loads(sys.argv[1]))))", json.dumps(args)]
    env = {**os.environ, **_MALLOC_ENV} if pin_malloc else dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark of {args} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _measure_isolated(args: Dict) -> Dict:
    """Speed in one fresh interpreter; peak RSS of one step in two more, one with glibc's mmap threshold
    pinned (``peak_mb``: live memory) and one as a plain process runs (``peak_mb_as_run``). Each figure
    belongs to this configuration alone."""
    result = _subprocess_measure(args, pin_malloc=False)
    if args.get("mode", "").startswith("train"):
        one_step = dict(args, steps=1, warmup=1, repeats=1)
        result["peak_mb"] = _subprocess_measure(one_step, pin_malloc=True)["peak_mb"]
        result["peak_mb_as_run"] = _subprocess_measure(one_step, pin_malloc=False)["peak_mb"]
    return result


def run_benchmark(models: Sequence[str], input_size=(1, 96, 96), batch: int = 64, device: str = "cpu",
                  steps: int = 5, eval_batch: int = 128, amp="off", channels_last: bool = False,
                  isolate: Optional[bool] = None, out=print, repeats: int = 3) -> List[Dict]:
    """Measure every configuration and print a side-by-side table; returns one row per model."""
    isolate = (device == "cpu") if isolate is None else isolate
    once = _measure_isolated if isolate else (lambda a: measure(**a))
    mixed = _amp_kind(amp) != "off"

    def run(args: Dict) -> Dict:
        """One configuration; under --amp also in float32, for its ``vs fp32`` ratio."""
        result = once(args)
        if mixed:
            result["fp32_images_per_second"] = once(dict(args, amp="off"))["images_per_second"]
        return result

    rows = []
    from .models import create_model
    for name in models:
        dense = name.startswith("densenet")
        size = list(input_size)
        with torch.device("meta"):
            native = create_model(name, num_classes=10, in_chans=size[0]).default_input_size
        if native[1] < size[1]:  # a 32x32 (CIFAR) network is measured at its own size, not blown up
            size = [size[0], native[1], native[2]]
        base = dict(name=name, input_size=size, device=device, steps=steps, amp=amp,
                    channels_last=channels_last, repeats=repeats)
        r = {"model": name, "input_size": size}
        # Our own networks (densenet_bc_cifar, the d2l ones, ...) have no torchvision twin: measured alone.
        paired = has_torchvision_counterpart(name)
        for impl in ("torchvision", "moderncnn") if paired else ("moderncnn",):
            key = "tv" if impl == "torchvision" else "ours"
            r[f"{key}_train"] = run(dict(base, impl=impl, mode="train", batch=batch))
            if impl == "torchvision":  # torchvision at its best eager setting: the reference of `vs tv-CL`
                r["tv_train_cl"] = (r["tv_train"] if channels_last else
                                    run(dict(base, impl=impl, mode="train", batch=batch, channels_last=True)))
            if dense:
                r[f"{key}_train_me"] = run(dict(base, impl=impl, mode="train_me", batch=batch))
        if paired:
            r["tv_eval"] = run(dict(base, impl="torchvision", mode="eval", batch=eval_batch,
                                    steps=max(2, steps // 2)))
        r["ours_eval_opt"] = run(dict(base, impl="moderncnn", mode="eval_opt", batch=eval_batch,
                                      steps=max(2, steps // 2)))
        rows.append(r)
        out(_format_row(r))
    return rows


def _ratio(value: Optional[float], reference: Optional[float]) -> str:
    return f"{value / reference:.2f}x" if value and reference else "-"


def _format_row(r: Dict) -> str:
    tv, tv_cl, ours, opt = r.get("tv_train"), r.get("tv_train_cl"), r["ours_train"], r["ours_eval_opt"]
    as_run = "peak_mb_as_run" in ours
    mixed = "fp32_images_per_second" in ours
    lines = [f"\n{r['model']} ({ours['device']}, input {'x'.join(map(str, r['input_size']))}, train batch "
             f"{ours['batch']}, eval batch {opt['batch']}){'' if tv else ': no torchvision counterpart'}",
             f"  {'configuration':36s} {'img/s':>8s}" + (f" {'vs fp32':>8s}" if mixed else "")
             + f" {'vs tv':>7s} {'vs tv-CL':>9s} {'peak MB':>8s} {'mem vs tv':>10s}"
             + (f" {'as run MB':>10s} {'mem vs tv':>10s}" if as_run else "")]

    def line(label, m, speed_refs=(tv, tv_cl), memory=True):
        text = f"  {label:36s} {m['images_per_second']:8.1f}"
        if mixed:
            text += f" {_ratio(m['images_per_second'], m.get('fp32_images_per_second')):>8s}"
        text += "".join(f" {_ratio(m['images_per_second'], ref and ref['images_per_second']):>{w}s}"
                        for ref, w in zip(speed_refs, (7, 9)))
        if memory:
            text += f" {m['peak_mb']:8.0f} {_ratio(m['peak_mb'], tv and tv['peak_mb']):>10s}"
            if as_run:
                text += (f" {m.get('peak_mb_as_run', float('nan')):10.0f} "
                         f"{_ratio(m.get('peak_mb_as_run'), tv and tv.get('peak_mb_as_run')):>10s}")
        lines.append(text)

    if tv:
        line("torchvision train", tv)
        line("torchvision train, channels-last", tv_cl)
    if "tv_train_me" in r:
        line("torchvision train memory_efficient", r["tv_train_me"])
    line("moderncnn train", ours)
    if "ours_train_me" in r:
        line("moderncnn train memory_efficient", r["ours_train_me"])
    if "tv_eval" in r:
        tv_eval = r["tv_eval"]
        lines.append(f"  {'torchvision eval()':36s} {tv_eval['images_per_second']:8.1f}"
                     + (f" {_ratio(tv_eval['images_per_second'], tv_eval.get('fp32_images_per_second')):>8s}"
                        if mixed else ""))
    label = {"off": "float32", "bf16": "bfloat16", "fp16": "float16"}[opt.get("precision", "off")]
    line(f"moderncnn optimize_for_inference, {label}", opt, speed_refs=(r.get("tv_eval"), None), memory=False)
    return "\n".join(lines)
