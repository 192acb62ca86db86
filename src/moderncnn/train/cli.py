"""``moderncnn train|eval|predict``: argument parsing only; the work is in the engine."""
from __future__ import annotations

import argparse
import sys

from ..cli import _EXTRA_COMMANDS
from .budget import parse_budget
from .config import MUON_LR, OPTIMIZERS, SCHEDULES, recipe_names

TRAIN_FLAGS = {  # flag -> TrainConfig field
    "model": "model", "dataset": "dataset", "data_dir": "data_dir", "image_size": "image_size",
    "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "optimizer": "optimizer", "muon_lr": "muon_lr",
    "momentum": "momentum", "schedule": "schedule", "warmup": "warmup", "weight_decay": "weight_decay",
    "label_smoothing": "label_smoothing", "ema": "ema", "grad_clip": "grad_clip", "subset": "subset",
    "recipe": "recipe", "seed": "seed", "device": "device", "amp": "amp", "channels_last": "channels_last",
    "compile": "compile", "out": "out", "name": "name", "resume": "resume", "tta": "tta",
    "augment": "augment", "download": "download", "budget": "budget", "sync_bn": "sync_bn",
    "pretrained": "pretrained", "freeze_backbone": "freeze_backbone", "head_lr_mult": "head_lr_mult",
    "val_fraction": "val_fraction", "init": "init", "memory_efficient": None,
    "progressive_size": "progressive_size", "progressive_fraction": "progressive_fraction",
    "eval_every": "eval_every",
}


def _budget(text: str) -> float:
    try:
        return parse_budget(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by ``train`` and ``compare`` (defaults None: the recipe decides)."""
    p.add_argument("--dataset", default=None, help="fashion-mnist (default), mnist, cifar10 or imagefolder")
    p.add_argument("--data-dir", default=None, help="where the dataset is (image folders: DIR/train, DIR/test)")
    p.add_argument("--download", action="store_true", default=None, help="download the dataset if missing")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this side (d2l: 96 or 224)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (all processes together)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (not rescaled for you)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="muon: Muon for the conv filters, SGD (--lr) for the rest")
    p.add_argument("--muon-lr", type=float, default=None,
                   help=f"peak learning rate of the conv filters under --optimizer muon (default {MUON_LR:g})")
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--schedule", choices=SCHEDULES, default=None)
    p.add_argument("--warmup", type=float, default=None, help="warm-up length in epochs")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--label-smoothing", type=float, default=None)
    p.add_argument("--ema", type=float, default=None, help="EMA decay of the weights (e.g. 0.999; 0 = off)")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm (0 = off)")
    p.add_argument("--augment", default=None,
                   help="none, crop, flip, crop+flip, crop+flip+erase; altflip in place of flip flips each image "
                        "every other epoch (Jordan 2024)")
    p.add_argument("--subset", type=int, default=None, help="use at most N train and N test images")
    p.add_argument("--recipe", default=None,
                   help=f"{', '.join(recipe_names())} (default: fast), or a JSON file of training options")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda or mps")
    p.add_argument("--amp", nargs="?", const=True, default=None, type=_amp_choice, metavar="auto",
                   help="bfloat16 autocast: --amp where the device has bfloat16 in hardware (CUDA; CPUs with "
                        "AVX512-BF16 or AMX), else an error; --amp auto: there, fp32 elsewhere (the cifar10 "
                        "recipe's setting)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 throughout")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--out", default=None, help="parent directory of run directories (default runs/)")
    p.add_argument("--name", default=None, help="run directory name (default: time-model-dataset)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (also off when stdout is not a terminal)")
    p.add_argument("--tta", type=int, nargs="?", const=1, default=None, metavar="LEVEL",
                   help="test-time augmentation of the final evaluation: 1 (the flag alone) flip, "
                        "2 flip + one-pixel shifts, 0 off")
    p.add_argument("--init", choices=["xavier", "whiten"], default=None,
                   help="weight initialisation: xavier (d2l) or whiten (first conv = patch-whitening basis)")
    p.add_argument("--progressive-size", type=int, default=None, metavar="SIDE",
                   help="progressive resizing: train the first epochs at this smaller side, growing in 4-pixel "
                        "steps to the full size (test images always at full size; 0 = off)")
    p.add_argument("--progressive-fraction", type=float, default=None, metavar="F",
                   help="share of the epochs that progressive resizing spends below the full size (default 0.7)")
    p.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="score the test set after every N-th epoch and after the last (default 1; 0: the last "
                        "only): a time budget then trains in the time the evaluations would take")
    p.add_argument("--val-fraction", type=float, default=None, help="image folders without test/: hold-out share")
    p.add_argument("--memory-efficient", action="store_true", default=None,
                   help="DenseNet: recompute concat-BN-ReLU in backward to save memory")
    p.add_argument("--model-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="constructor argument of the model, e.g. small_input=True (repeatable)")


def _amp_choice(value: str):
    if value != "auto":
        raise argparse.ArgumentTypeError(f"--amp takes no value or 'auto', got {value!r}")
    return value


def config_from_args(args) -> tuple:
    from .config import TrainConfig
    values, explicit = {}, set()
    for flag, fieldname in TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None or fieldname is None:
            continue
        values[fieldname] = value
        explicit.add(fieldname)
    cfg = TrainConfig(**values)
    kwargs = parse_model_args(getattr(args, "model_arg", None) or [])
    if getattr(args, "memory_efficient", None):
        kwargs["memory_efficient"] = True
    if kwargs:
        cfg.model_kwargs = kwargs
        explicit.add("model_kwargs")
    return cfg, explicit


def parse_model_args(items) -> dict:
    """["small_input=True", "drop_rate=0.2", "block_config=(4,8,8)"] -> {...} (Python literals, else strings)."""
    import ast
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key.strip()] = value
    return out


def cmd_train(args) -> int:
    from .engine import TrainingInterrupted, train
    cfg, explicit = config_from_args(args)
    try:
        train(cfg, explicit=explicit)
    except TrainingInterrupted as stop:
        print(stop, file=sys.stderr)
        return stop.exit_code
    return 0


def cmd_eval(args) -> int:
    from ..data import Loader, load_dataset
    from .checkpoint import load_checkpoint, resolve_checkpoint
    from .engine import build_model_from_checkpoint, evaluate, pick_device
    path = resolve_checkpoint(args.checkpoint)
    state = load_checkpoint(path)
    device = pick_device(args.device)
    model = build_model_from_checkpoint(state, str(path)).to(device)
    cfg = state.get("config", {})
    dataset = args.dataset or state.get("dataset") or cfg.get("dataset")
    data_dir = args.data_dir or cfg.get("data_dir")
    kwargs = {}
    if dataset == "imagefolder":
        kwargs = dict(image_size=state.get("image_size"), val_fraction=cfg.get("val_fraction"), seed=cfg.get("seed", 0),
                      channels=state["in_chans"])
    test = load_dataset(dataset, root=data_dir, split="test", **kwargs)
    if args.subset:
        test = test.subset(args.subset, seed=cfg.get("seed", 0))
    if test.images.shape[1] != state["in_chans"]:
        raise ValueError(f"{dataset} has {test.images.shape[1]}-channel images; the model was trained on "
                         f"{state['in_chans']}-channel images")
    norm = state["normalization"]
    loader = Loader(test, args.batch_size, train=False, image_size=state["image_size"], device=device,
                    mean=norm["mean"], std=norm["std"])
    loss, acc = evaluate(model, loader, tta=args.tta)
    print(f"{state['model_name']} on {dataset} test ({len(test):,} images): test accuracy: {acc:.4f}  loss: {loss:.4f}")
    return 0


def cmd_predict(args) -> int:
    from .predict import predict_files
    for path, top in predict_files(args.checkpoint, args.images, top_k=args.top_k, device=args.device):
        print(f"{path}: " + ", ".join(f"{name} {prob:.4f}" for name, prob in top))
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a model (default: a small DenseNet-BC on Fashion-MNIST)")
    p.add_argument("--model", default=None, help="registered model name (default densenet_bc_fmnist)")
    add_train_arguments(p)
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a run from its last.pt")
    p.add_argument("--budget", type=_budget, default=None, metavar="TIME",
                   help="train for about this long (90s, 10m, 1.5h or seconds): the epochs are planned from "
                        "measured epoch times so the schedule ends with the budget; --epochs, if given, is the "
                        "most")
    p.add_argument("--sync-bn", action="store_true", default=None, help="SyncBatchNorm under torchrun")
    p.add_argument("--pretrained", nargs="?", const=True, default=None,
                   help="start from torchvision's ImageNet weights (or a local state-dict file)")
    p.add_argument("--freeze-backbone", action="store_true", default=None, help="train the classifier only")
    p.add_argument("--head-lr-mult", type=float, default=None, help="learning-rate factor of the classifier")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="test accuracy of a trained run or checkpoint")
    p.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT")
    p.add_argument("--dataset", default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--tta", type=int, nargs="?", const=1, default=0, metavar="LEVEL",
                   help="test-time augmentation: 1 (the flag alone) flip, 2 flip + one-pixel shifts")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-k classes for image files")
    p.add_argument("checkpoint", metavar="RUN_DIR|CHECKPOINT|MODEL.onnx")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_predict)


_EXTRA_COMMANDS.append(register)
