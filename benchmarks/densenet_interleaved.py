"""DenseNet training steps of several configurations, interleaved in one process.

    python benchmarks/densenet_interleaved.py [--model densenet121] [--input 1x96x96] [--batch 64]
        [--configs tv-cl,ours,ours-shared,ours-me] [--rounds 5] [--amp]

Each round times one SGD step of every configuration in turn, so that all of them see the same state of a
shared machine; prints each one's median and best images/s and its ratio to the first configuration.
`moderncnn bench` measures each configuration in a fresh process instead (and peak memory).

Configurations: tv (torchvision), tv-cl (torchvision channels-last), tv-me (torchvision memory_efficient),
ours (moderncnn, normal mode), ours-shared (shared_statistics=True), ours-me (memory_efficient=True).
"""
import argparse
import statistics
import time

import torch

from moderncnn import create_model
from moderncnn.bench import torchvision_counterpart
from moderncnn.cli import _parse_size


def build(config: str, name: str, in_chans: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if config.startswith("tv"):
        model = torchvision_counterpart(name, 10, in_chans, memory_efficient=config == "tv-me")
        return model.to(memory_format=torch.channels_last) if config == "tv-cl" else model
    options = {"ours": {}, "ours-shared": {"shared_statistics": True}, "ours-me": {"memory_efficient": True}}
    return create_model(name, num_classes=10, in_chans=in_chans, **options[config])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--input", type=_parse_size, default=(1, 96, 96))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--configs", default="tv-cl,ours,ours-shared,ours-me")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    args = parser.parse_args()
    configs = args.configs.split(",")
    x = torch.randn(args.batch, *args.input).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch,))
    steps = {}
    for config in configs:
        model = build(config, args.model, args.input[0]).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        step()   # warm-up
        steps[config] = step
    times = {config: [] for config in configs}
    for _ in range(args.rounds):
        for config in configs:
            start = time.perf_counter()
            steps[config]()
            times[config].append(time.perf_counter() - start)
    reference = statistics.median(times[configs[0]])
    print(f"{args.model}, input {'x'.join(map(str, args.input))}, batch {args.batch}, {args.rounds} rounds"
          f"{', bf16 autocast' if args.amp else ''}")
    for config in configs:
        median = statistics.median(times[config])
        print(f"  {config:12s} median {args.batch / median:7.1f} img/s  best {args.batch / min(times[config]):7.1f}"
              f"  {reference / median:5.2f}x {configs[0]}")


if __name__ == "__main__":
    main()
