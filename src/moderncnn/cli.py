"""Command line: ``moderncnn models|summary|train|eval|predict|compare|bench|export|lr-find``.

Thin by design: each command parses its arguments and calls the Python API. :data:`COMMANDS` is the whole
table; the train flags are the fields of :class:`~moderncnn.runs.TrainConfig`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from .runs import ModerncnnWarning, TrainConfig, UsageError

__all__ = ["main", "build_parser", "COMMANDS", "config_from_args", "add_train_arguments"]


def _parse_size(text: str):
    """'1x96x96' -> (1, 96, 96); '96' -> (96,)."""
    try:
        return tuple(int(t) for t in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 1x96x96, got {text!r}") from None


def _budget(text: str) -> float:
    from .training.budget import parse_budget
    try:
        return parse_budget(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1], got {text!r}")
    return value


def _amp_choice(value: str) -> str:
    from .runs import normalize_amp
    try:
        return normalize_amp(value, "--amp")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown_defaults() -> Dict[str, str]:
    """Each train flag's default as the help shows it: the value the default recipe resolves to."""
    from .training.config import RECIPES, merge_recipe
    resolved = merge_recipe(TrainConfig())
    shown = {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(resolved, f.name)
        text = "none" if value is None or value == {} else str(value).lower() if isinstance(value, bool) else str(value)
        shown[f.name] = text + (" in the fast recipe" if f.name in RECIPES["fast"].settings else "")
    return shown


def _special_flags(p, name: str, help: str) -> bool:
    """The fields whose flags are not plain values; True where ``name`` was one."""
    if name == "model_kwargs":
        p.add_argument("--model-arg", action="append", default=None, metavar="KEY=VALUE", help=help)
        p.add_argument("--memory-efficient", action="store_true", default=None,
                       help="DenseNet: recompute concat-BN-ReLU in backward to save memory (default: off)")
    elif name == "amp":
        p.add_argument("--amp", nargs="?", const="auto", default=None, type=_amp_choice,
                       metavar="{auto,bf16,fp16,off}", help=help)
        p.add_argument("--no-amp", dest="amp", action="store_const", const="off", help="float32 throughout (--amp off)")
    elif name == "tta":
        p.add_argument("--tta", type=int, nargs="?", const=1, default=None, metavar="LEVEL", help=help)
    elif name == "budget":
        p.add_argument("--budget", type=_budget, default=None, metavar="TIME", help=help)
    elif name == "pretrained":
        p.add_argument("--pretrained", nargs="?", const=True, default=None, metavar="FILE", help=help)
    else:
        return False
    return True


# `train --help` in groups; a field not named here goes to "run control".
_TRAIN_GROUPS = {
    "model": ("model", "model_kwargs", "init", "pretrained", "freeze_backbone", "head_lr_mult", "sync_bn"),
    "data": ("dataset", "data_dir", "download", "image_size", "augment", "rrc_scale", "normalize", "subset",
             "val_split", "val_fraction", "resize", "data_cache", "cache_dir", "decode_workers", "strict_data",
             "progressive_size", "progressive_fraction"),
    "optimisation": ("batch_size", "lr", "optimizer", "muon_lr", "momentum", "muon_momentum", "muon_normalize",
                     "bias_lr", "first_conv_bias_epochs", "weight_decay", "label_smoothing", "ema", "grad_clip"),
    "schedule": ("epochs", "schedule", "warmup", "budget", "eval_every", "tta", "tta_below"),
    "precision": ("amp", "fp32_precision", "channels_last", "compile", "device"),
    "output": ("out", "name", "progress", "quiet", "tensorboard"),
}


def _train_groups(p: argparse.ArgumentParser) -> Dict[str, Any]:
    """field name -> the argument group its flag is listed in."""
    groups = {title: p.add_argument_group(title) for title in (*_TRAIN_GROUPS, "run control")}
    placed = {name: groups[title] for title, names in _TRAIN_GROUPS.items() for name in names}
    return {f.name: placed.get(f.name, groups["run control"]) for f in dataclasses.fields(TrainConfig)} | {
        "config": groups["run control"]}


def add_train_arguments(p: argparse.ArgumentParser, skip: Tuple[str, ...] = ()) -> None:
    """One flag per :class:`TrainConfig` field (default None: the recipe decides), with its help and the
    default it resolves to, listed in groups."""
    from .data.folder import CACHE_MODES, RESIZE_MODES
    from .training.config import FP32_PRECISIONS, INITS, OPTIMIZERS, SCHEDULES
    choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "init": INITS, "resize": RESIZE_MODES,
               "data_cache": CACHE_MODES, "fp32_precision": FP32_PRECISIONS}
    kinds = {"int": int, "float": float, "str": str}
    defaults = _shown_defaults()
    group_of = _train_groups(p)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        g = group_of[f.name]
        help = f.metadata["help"]
        if "(default" not in help:  # a help that states its own default keeps it
            help = f"{help} (default: {defaults[f.name]})"
        help = help.replace("%", "%%")
        if _special_flags(g, f.name, help):
            continue
        kind = str(f.type).replace("Optional[", "").rstrip("]")
        if kind == "bool":
            g.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            g.add_argument(_flag(f.name), type=kinds.get(kind, str), choices=choices.get(f.name), default=None,
                           help=help)
    group_of["config"].add_argument("--config", default=None, metavar="FILE",
                   help="replay a run's config.json, or read a recipe JSON file of training options; flags given "
                        "here win (default: none)")


def parse_model_args(items) -> dict:
    """["small_input=True", "drop_rate=0.2", "block_config=(4,8,8)"] -> {...} (Python literals, else strings)."""
    import ast
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def config_from_args(args) -> Tuple[Dict[str, Any], Set[str]]:
    """(training options, the fields the user set): ``--config`` FILE's options, then the flags given."""
    from .training.config import load_config_file
    values: Dict[str, Any] = load_config_file(args.config) if getattr(args, "config", None) else {}
    for f in dataclasses.fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is not None and f.name != "model_kwargs":
            values[f.name] = value
    kwargs = parse_model_args(getattr(args, "model_arg", None) or [])
    if getattr(args, "memory_efficient", None):
        kwargs["memory_efficient"] = True
    if kwargs:
        values["model_kwargs"] = {**values.get("model_kwargs", {}), **kwargs}
    return values, set(values)


# --- the commands ----------------------------------------------------------------------------------------
def _json_line(data) -> None:
    print(json.dumps(data), flush=True)


def _models_arguments(p):
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'densenet*' (default: *)")
    p.add_argument("--json", action="store_true", help="one JSON array of objects on stdout (default: a table)")


def cmd_models(args) -> int:
    import torch
    from .models import create_model, list_models
    from .report.summary import count_parameters
    names = list_models(args.pattern)
    try:
        pretrained = set(list_models(args.pattern, pretrained=True))
    except ImportError:
        pretrained = set()
    rows = []
    for name in names:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            model = create_model(name)
        rows.append({"name": name, "params": count_parameters(model), "num_classes": model.num_classes,
                     "default_input": list(model.default_input_size), "min_input": list(model.min_input_size),
                     "pretrained": name in pretrained})
    if args.json:
        _json_line(rows)
        return 0
    print(f"{'model':18s} {'params':>12s} {'classes':>8s}  {'default input':>13s}  {'min input':>9s}  pretrained")
    for r in rows:
        default, side = "x".join(map(str, r["default_input"])), r["min_input"][1]
        print(f"{r['name']:18s} {r['params']:>12,d} {r['num_classes']:>8d}  {default:>13s}  "
              f"{f'{side}x{side}':>9s}  {'yes' if r['pretrained'] else ''}")
    print(f"{len(names)} models")
    return 0


def _summary_arguments(p):
    p.add_argument("model", help="registered model name (see moderncnn models)")
    p.add_argument("--input", type=_parse_size, default=(1, 96, 96), help="CxHxW (default: 1x96x96)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (default: 10)")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=1,
                   help="batch size (--batch is the old spelling) (default: 1)")
    p.add_argument("--depth", type=int, default=None, help="nesting depth to list, 1: block by block (default: all)")
    p.add_argument("--small-input", action="store_true", help="build the small-image (CIFAR) stem (default: off)")
    _json_flag(p, "one JSON object on stdout: totals and one entry per layer (default: a table)")


def cmd_summary(args) -> int:
    from .models import create_model
    from .report.summary import summary
    size = args.input
    if len(size) == 1:
        size = (3, size[0], size[0])
    if len(size) != 3:
        raise UsageError(f"--input must be CxHxW (e.g. 1x96x96), got {'x'.join(map(str, size))}")
    kwargs = {"small_input": True} if args.small_input else {}
    model = create_model(args.model, num_classes=args.classes, in_chans=size[0], **kwargs)
    result = summary(model, (args.batch_size, *size), depth=args.depth)
    if args.json:
        _json_line({"model": result.model_name, "input_size": list(result.input_size),
                    "output_shape": list(result.output_shape), "params": result.total_params,
                    "trainable_params": result.trainable_params, "flops": result.total_flops,
                    "activation_bytes": result.activation_bytes, "layers": result.as_rows()})
        return 0
    print(result)
    return 0


def _json_flag(p, help: str) -> None:
    p.add_argument("--json", action="store_true", help=help)


def _train_arguments(p):
    add_train_arguments(p)
    _json_flag(p, "at the end, one JSON object on stdout: run_dir, test and validation accuracy, epochs, "
                  "training seconds (default: the report's lines only)")


def cmd_train(args) -> int:
    from .training import TrainingInterrupted, train
    values, explicit = config_from_args(args)
    try:
        result = train(TrainConfig.from_dict(values), explicit=explicit)
    except TrainingInterrupted as stop:
        print(stop, file=sys.stderr)
        return stop.exit_code
    if getattr(args, "json", False):
        _json_line({"run_dir": str(result.run_dir), "test_acc": result.final_acc, "val_acc": result.val_acc,
                    "chosen_epoch": result.chosen_epoch, "epochs": len(result.history),
                    "train_seconds": result.train_seconds, "params": result.params, "flops": result.flops})
    return 0


def _eval_arguments(p):
    p.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT",
                   help="a run directory (its best.pt, else last.pt) or a checkpoint file")
    p.add_argument("--dataset", default=None, help="another dataset's test split (default: the run's)")
    p.add_argument("--data-dir", default=None, help="where that dataset is (default: the run's)")
    p.add_argument("--subset", type=int, default=None, help="at most N test images (default: all)")
    p.add_argument("--batch-size", type=int, default=256, help="(default: 256)")
    p.add_argument("--tta", type=int, nargs="?", const=1, default=0, metavar="LEVEL",
                   help="test-time augmentation: 1 (the flag alone) flip, 2 flip + one-pixel shifts (default: 0)")
    p.add_argument("--tta-below", type=_probability, default=1.0, metavar="P",
                   help="the TTA views only for the images whose plain top probability is under P (default: 1, "
                        "every image)")
    p.add_argument("--device", default="auto", help="(default: auto)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout (default: a line of text)")


def cmd_eval(args) -> int:
    from .predict import evaluate_checkpoint
    r = evaluate_checkpoint(args.checkpoint, args.dataset, args.data_dir, args.subset, args.batch_size, args.tta,
                            args.device, tta_below=args.tta_below)
    if args.json:
        _json_line({"model": r.model, "dataset": r.dataset, "images": r.images, "loss": r.loss,
                    "accuracy": r.accuracy, "checkpoint": str(r.checkpoint)})
        return 0
    print(f"{r.model} on {r.dataset} test ({r.images:,} images, {r.checkpoint.name}): test accuracy: "
          f"{r.accuracy:.4f}  loss: {r.loss:.4f}")
    return 0


def _predict_arguments(p):
    p.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT|EXPORTED",
                   help="a run directory, a checkpoint file, or an exported model (.pt2, .onnx, .safetensors, "
                        ".aoti.pt2, TorchScript)")
    p.add_argument("images", nargs="+", metavar="PATH", help="image files, directories (searched recursively) "
                                                             "or globs")
    p.add_argument("--top-k", type=int, default=3, help="(default: 3)")
    p.add_argument("--device", default="cpu", help="(default: cpu)")
    p.add_argument("--json", action="store_true", help="one JSON object per image on stdout: path, top_k "
                                                       "[{label, prob}] (default: a line of text per image)")


def cmd_predict(args) -> int:
    """Every readable image is predicted; each path that failed is named on stderr and makes the exit 1."""
    from .predict import predict_paths
    found = predict_paths(args.checkpoint, args.images, top_k=args.top_k, device=args.device)
    for path, top in found.results:
        if args.json:
            _json_line({"path": path, "top_k": [{"label": name, "prob": prob} for name, prob in top]})
        else:
            print(f"{path}: " + ", ".join(f"{name} {prob:.4f}" for name, prob in top))
    for path, reason in found.failures:
        print(f"moderncnn predict: error: {path}: {reason}", file=sys.stderr)
    return 1 if found.failures else 0


def _compare_arguments(p):
    p.add_argument("--models", required=True, help="comma-separated model names")
    add_train_arguments(p, skip=("model", "resume", "name", "out", "progress"))
    p.add_argument("--out", default="runs", help="parent directory of the comparison (default: runs)")
    p.add_argument("--name", default=None, help="comparison directory name (default: time-compare-dataset)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    _json_flag(p, "at the end, one JSON object on stdout: the comparison directory and its report")


def cmd_compare(args) -> int:
    from .compare import compare
    values, _ = config_from_args(args)
    for own in ("out", "name", "progress"):  # the comparison's, not its runs'
        values.pop(own, None)
    folder = compare(args.models.split(","), out=args.out, name=args.name, progress=args.progress, **values)
    if args.json:
        _json_line({"comparison_dir": str(folder), "report": str(Path(folder) / "report.md")})
    return 0


def _bench_arguments(p):
    p.add_argument("--models", default="densenet121,densenet_bc_100,resnet18",
                   help="(default: densenet121,densenet_bc_100,resnet18)")
    p.add_argument("--input", type=_parse_size, default=(1, 96, 96), help="CxHxW (default: 1x96x96)")
    p.add_argument("--batch-size", "--batch", dest="batch_size", type=int, default=64,
                   help="training batch (--batch is the old spelling) (default: 64)")
    p.add_argument("--eval-batch-size", "--eval-batch", dest="eval_batch_size", type=int, default=128,
                   help="inference batch (--eval-batch is the old spelling) (default: 128)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per round (default: 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per configuration; the fastest counts "
                                                            "(default: 3)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: cpu)")
    p.add_argument("--amp", nargs="?", const="auto", default="off", type=_amp_choice,
                   metavar="{auto,bf16,fp16,off}",
                   help="run both implementations under this autocast (fp16 with a GradScaler; auto: bf16 where "
                        "the device has it natively, as train decides), each configuration also in float32 for a "
                        "'vs fp32' column (default: off, float32 only)")
    p.add_argument("--no-amp", dest="amp", action="store_const", const="off", help="float32 only (--amp off)")
    p.add_argument("--channels-last", action="store_true", help="(default: off)")
    _json_flag(p, "one JSON array on stdout: every configuration's measurement; the tables go to stderr "
                  "(default: tables on stdout)")


def cmd_bench(args) -> int:
    from .bench import run_benchmark
    from .hardware import native_bf16
    amp = args.amp
    if amp == "auto":
        amp = "bf16" if native_bf16(args.device)[0] else "off"
    rows = run_benchmark(args.models.split(","), args.input, args.batch_size, args.device, args.steps,
                         args.eval_batch_size, amp, args.channels_last, repeats=args.repeats,
                         out=(lambda text: print(text, file=sys.stderr)) if args.json else print)
    if args.json:
        _json_line(rows)
    return 0


def _export_arguments(p):
    from .export import FORMATS, ONNX_EXPORTERS
    p.add_argument("source", metavar="RUN_DIR|CHECKPOINT", help="the trained run or checkpoint to export")
    p.add_argument("--format", choices=list(FORMATS), default="onnx",
                   help="pt2: torch.export program; onnx: the dynamo exporter; safetensors: the weights, for "
                        "fine-tuning; aoti: an AOTInductor package (needs a C++ compiler); torchscript: "
                        "deprecated in torch (default: onnx)")
    p.add_argument("--out", "--output", dest="output", default=None,
                   help="file to write (--output is the old spelling) (default: model.pt2, model.onnx, "
                        "model.safetensors, model.aoti.pt2 or model.torchscript.pt beside the checkpoint)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    p.add_argument("--onnx-exporter", choices=list(ONNX_EXPORTERS), default="dynamo",
                   help="dynamo (torch.onnx.export(dynamo=True)), or the legacy TorchScript-based exporter, "
                        "also used where the dynamo one is missing (default: dynamo)")
    _json_flag(p, "one JSON object on stdout: the file written, its format and its preprocessing JSON")


def cmd_export(args) -> int:
    from .export import export, meta_path
    path = export(args.source, args.format, args.output, args.opset, args.onnx_exporter)
    if args.json:
        _json_line({"path": str(path), "format": args.format, "meta": str(meta_path(path))})
        return 0
    print(f"wrote {path} and {meta_path(path)}")
    return 0


def _lr_find_arguments(p):
    add_train_arguments(p, skip=("resume", "budget", "quiet"))
    p.add_argument("--steps", type=int, default=100, help="steps of the sweep (default: 100)")
    p.add_argument("--start-lr", type=float, default=1e-6, help="(default: 1e-06)")
    p.add_argument("--end-lr", type=float, default=10.0, help="(default: 10.0)")
    for flag in ("--resume", "--budget"):  # refused with one line, not an argparse usage message
        p.add_argument(flag, dest=f"refused_{flag[2:]}", default=None, help=argparse.SUPPRESS)
    _json_flag(p, "one JSON object on stdout: the suggestion, the sweep's rates and losses, the plot")


def cmd_lr_find(args) -> int:
    from .training.lr_find import lr_find
    for flag in ("resume", "budget"):
        if getattr(args, f"refused_{flag}") is not None:
            raise UsageError(f"lr-find sweeps a fixed number of steps from the initial weights: it takes no --{flag}")
    values, explicit = config_from_args(args)
    result = lr_find(TrainConfig.from_dict(values), explicit, steps=args.steps, start_lr=args.start_lr,
                     end_lr=args.end_lr)
    if args.json:
        _json_line({"suggestion": result.suggestion, "min_loss_lr": result.min_loss_lr, "steepest": result.steepest,
                    "lrs": result.lrs, "losses": result.losses, "smoothed": result.smoothed,
                    "plot": str(result.run_dir / "lr_find.png")})
        return 0
    print(f"suggested learning rate: {result.suggestion:.3g} (a tenth of {result.min_loss_lr:.3g}, where the "
          f"smoothed loss is lowest; steepest descent at {result.steepest:.3g}); plot: "
          f"{result.run_dir / 'lr_find.png'}")
    return 0


def _report_arguments(p):
    p.add_argument("run", metavar="RUN_DIR", help="a finished run directory")
    _json_flag(p, "one JSON object on stdout: the report written")


def cmd_report(args) -> int:
    from .report.run import write_run_report
    path = write_run_report(args.run)
    if args.json:
        _json_line({"report": str(path)})
        return 0
    print(f"wrote {path}")
    return 0


# name -> (help, argument builder, handler)
COMMANDS: Dict[str, Tuple[str, Callable, Callable]] = {
    "models": ("list the registered models with parameter counts", _models_arguments, cmd_models),
    "summary": ("layer-by-layer shapes, parameters, FLOPs and activation memory", _summary_arguments, cmd_summary),
    "train": ("train a model (default: a small DenseNet-BC on Fashion-MNIST)", _train_arguments, cmd_train),
    "eval": ("test accuracy of a trained run or checkpoint", _eval_arguments, cmd_eval),
    "predict": ("top-k classes for image files", _predict_arguments, cmd_predict),
    "report": ("rebuild a run's report.md and plots from its files", _report_arguments, cmd_report),
    "compare": ("train several models alike and write one comparison report", _compare_arguments, cmd_compare),
    "bench": ("speed and memory side by side with torchvision", _bench_arguments, cmd_bench),
    "export": ("export a trained model: torch.export (.pt2), ONNX, safetensors, AOTInductor, TorchScript",
               _export_arguments, cmd_export),
    "lr-find": ("learning-rate range test: sweep the learning rate and suggest one", _lr_find_arguments,
                cmd_lr_find),
}


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    parser = argparse.ArgumentParser(prog="moderncnn", description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"moderncnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help, arguments, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help, allow_abbrev=False)
        arguments(p)
        p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        p.set_defaults(func=handler)
    return parser


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_default_format = warnings.formatwarning


def _warning_line(message, category, filename, lineno, line=None) -> str:
    """moderncnn's own warnings as one line; those of torch and other libraries as Python shows them."""
    if issubclass(category, ModerncnnWarning) or os.path.abspath(filename).startswith(_PACKAGE_DIR):
        return f"moderncnn: warning: {message}\n"
    return _default_format(message, category, filename, lineno, line)


class _ConsoleHandler(logging.Handler):
    """The library's log on the console: notes to stdout as they are, warnings to stderr as one line each,
    written to the streams of the moment (a test's capture, a redirect made after start-up)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if record.levelno >= logging.WARNING:
                print(f"moderncnn: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr, flush=True)
            else:
                print(record.getMessage(), flush=True)
        except Exception:  # noqa: BLE001 - logging's own contract: a failing handler reports, never raises
            self.handleError(record)


@contextlib.contextmanager
def _console_logging():
    """Show the ``moderncnn`` logger's info and warnings on the console for one command."""
    logger, handler = logging.getLogger("moderncnn"), _ConsoleHandler()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _usage_errors() -> tuple:
    """Bad values and combinations, which exit 2 as argparse's do (failures at run time exit 1)."""
    from .models.layers import InputTooSmallError
    from .models.registry import UnknownModelError
    return UsageError, UnknownModelError, InputTooSmallError


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError):
        text = f"missing key {exc}"
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    if not text or not isinstance(exc, (ValueError, OSError, RuntimeError)):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: every error is one line, ``moderncnn <command>: error: <message>``; exit 2 for usage
    errors, 1 for failures at run time, 130/143 for Ctrl-C/SIGTERM; ``--debug`` shows the traceback."""
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _warning_line
    try:
        with _console_logging():
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"moderncnn {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # noqa: BLE001 - the one place every failure becomes one line
        if args.debug:
            raise
        print(f"moderncnn {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, _usage_errors()) else 1
