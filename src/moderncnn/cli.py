"""Command line: ``moderncnn models|summary|train|eval|predict|compare|bench|export``.

Thin by design: each sub-command parses its arguments and calls the Python API.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _parse_size(text: str):
    """'1x96x96' -> (1, 96, 96); '96' -> (96,)."""
    try:
        return tuple(int(t) for t in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 1x96x96, got {text!r}") from None


def cmd_models(args) -> int:
    from .models import create_model, list_models
    from .report.summary import count_parameters
    names = list_models(args.pattern)
    try:
        pretrained = set(list_models(args.pattern, pretrained=True))
    except ImportError:
        pretrained = set()
    import torch
    # Each model as its constructor builds it by default (ImageNet networks: 1000 classes, RGB 224x224;
    # CIFAR/Fashion-MNIST networks: 10 classes at 32x32 or 28x28/96x96).
    print(f"{'model':18s} {'params':>12s} {'classes':>8s}  {'default input':>13s}  {'min input':>9s}  pretrained")
    for name in names:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = create_model(name)
        side = model.min_input_size[1]
        mark = "yes" if name in pretrained else ""
        default = "x".join(map(str, model.default_input_size))
        print(f"{name:18s} {count_parameters(model):>12,d} {model.num_classes:>8d}  {default:>13s}  "
              f"{f'{side}x{side}':>9s}  {mark}")
        del model
    print(f"{len(names)} models")
    return 0


def cmd_summary(args) -> int:
    from .models import create_model
    from .report.summary import summary
    size = args.input
    if len(size) == 1:
        size = (args.in_chans or 3, size[0], size[0])
    if len(size) != 3:
        raise SystemExit(f"--input must be CxHxW (e.g. 1x96x96), got {'x'.join(map(str, size))}")
    kwargs = {"small_input": True} if args.small_input else {}
    model = create_model(args.model, num_classes=args.classes, in_chans=size[0], **kwargs)
    print(summary(model, (args.batch, *size), depth=args.depth))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(prog="moderncnn", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"moderncnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the registered models with parameter counts")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'densenet*'")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("summary", help="layer-by-layer shapes, parameters, FLOPs and activation memory")
    p.add_argument("model")
    p.add_argument("--input", type=_parse_size, default=(1, 96, 96), help="CxHxW (default 1x96x96)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--depth", type=int, default=None, help="nesting depth to list (1: block by block)")
    p.add_argument("--small-input", action="store_true", help="build the small-image (CIFAR) stem")
    p.add_argument("--in-chans", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_summary)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Sub-commands living in other modules add themselves here (train, eval, predict, compare, bench, export).
_EXTRA_COMMANDS: List = []


def _register_commands() -> None:
    # Importing a command's module appends its registration function to _EXTRA_COMMANDS (once).
    import importlib
    for module in ("train.cli", "compare", "bench", "export"):
        try:
            importlib.import_module(f"moderncnn.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"moderncnn.{module}":
                raise


def main(argv: Optional[List[str]] = None) -> int:
    _register_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"moderncnn {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
