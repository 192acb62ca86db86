"""Inference throughput of ``optimize_for_inference`` against torchvision's ``eval()``, lever by lever.

    python benchmarks/inference.py [--model densenet121] [--input 1x96x96] [--batch-size 128] [--rounds 3]
                                   [--steps 4] [--no-compile] [--json out.json]

Every configuration runs in a fresh process (as `moderncnn bench` measures), the rounds interleave the
configurations, and each keeps its fastest round. The levers are added one at a time: channels-last with the
DenseNet block buffer (our plain ``eval()``), BatchNorm folded (float32), bfloat16, and ``torch.compile`` with
freezing; then ``optimize_for_inference()`` as called with no options, which takes bfloat16 only where the CPU
computes it natively. torchvision under bfloat16 autocast is the like-for-like reference of the bfloat16 rows.
"""
import argparse
import json
import platform

from moderncnn.bench import _subprocess_measure
from moderncnn.cli import _parse_size
from moderncnn.hardware import cpu_bf16_feature

CONFIGS = [  # label, measure() arguments
    ("torchvision eval(), float32", dict(impl="torchvision", mode="eval")),
    ("torchvision eval(), bfloat16 autocast", dict(impl="torchvision", mode="eval", amp="bf16")),
    ("moderncnn eval(), channels-last, float32", dict(impl="moderncnn", mode="eval", channels_last=True)),
    ("+ BatchNorm folded (float32)", dict(impl="moderncnn", mode="eval_opt", inference={"precision": "off"})),
    ("+ bfloat16", dict(impl="moderncnn", mode="eval_opt", inference={"precision": "bf16"})),
    ("folded + compile, float32", dict(impl="moderncnn", mode="eval_opt",
                                       inference={"precision": "off", "compile": True})),
    ("folded + compile, bfloat16", dict(impl="moderncnn", mode="eval_opt",
                                        inference={"precision": "bf16", "compile": True})),
    ("optimize_for_inference() as called plainly", dict(impl="moderncnn", mode="eval_opt",
                                                        inference={"precision": "auto"})),
]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="densenet121")
    p.add_argument("--input", default="1x96x96", type=_parse_size)
    p.add_argument("--batch-size", "--batch", dest="batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    configs = [c for c in CONFIGS if not (args.no_compile and c[1].get("inference", {}).get("compile"))]
    best = {label: None for label, _ in configs}
    for round_ in range(args.rounds):
        for label, extra in configs:
            r = _subprocess_measure(dict(name=args.model, input_size=list(args.input), batch=args.batch,
                                         steps=args.steps, warmup=2, **extra), pin_malloc=False)
            if best[label] is None or r["images_per_second"] > best[label]["images_per_second"]:
                best[label] = r
            print(f"round {round_ + 1}: {label:46s} {r['images_per_second']:8.1f} img/s", flush=True)
    reference = best[configs[0][0]]["images_per_second"]
    print(f"\n{args.model}, input {'x'.join(map(str, args.input))}, batch {args.batch}; {cpu_model()}, "
          f"native bfloat16: {cpu_bf16_feature() or 'no'}; best of {args.rounds} rounds, fresh processes")
    print(f"  {'configuration':46s} {'img/s':>8s} {'vs tv eval':>11s}")
    for label, _ in configs:
        ips = best[label]["images_per_second"]
        print(f"  {label:46s} {ips:8.1f} {ips / reference:10.2f}x  ({best[label]['precision']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "input": list(args.input), "batch": args.batch, "cpu": cpu_model(),
                       "native_bf16": cpu_bf16_feature(), "results": best}, f, indent=1)


if __name__ == "__main__":
    main()
