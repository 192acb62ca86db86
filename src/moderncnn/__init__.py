"""moderncnn: the modern CNN family (AlexNet, VGG, NiN, GoogLeNet, ResNet, DenseNet) by name --
see it, train it, compare it, export it.

The names below load on first use: ``import moderncnn.models`` builds models without loading the trainer.
Library messages (notes, warnings about the run) go to the ``logging`` logger ``"moderncnn"``; the command line
shows them, a program configures logging as it likes.
"""
import importlib
import logging

from ._version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

# name -> the module that defines it
_EXPORTS = {
    "create_model": "moderncnn.models", "list_models": "moderncnn.models", "register_model": "moderncnn.models",
    "UnknownModelError": "moderncnn.models", "InputTooSmallError": "moderncnn.models",
    "ImageClassifier": "moderncnn.models",
    "optimize_for_inference": "moderncnn.models.inference", "summary": "moderncnn.report.summary",
    "TrainConfig": "moderncnn.runs", "load_model": "moderncnn.runs", "load_run": "moderncnn.runs",
    "Callback": "moderncnn.training.callback", "show_run": "moderncnn.report.notebook",
    "lr_find": "moderncnn.training.lr_find",
}

__all__ = ["__version__", "train", *_EXPORTS]


def train(config=None, explicit=None, callbacks=(), *, model=None, dataset=None, data_dir=None, download=None,
          image_size=None, epochs=None, batch_size=None, lr=None, optimizer=None, muon_lr=None, momentum=None,
          muon_momentum=None, muon_normalize=None, bias_lr=None, first_conv_bias_epochs=None, schedule=None,
          warmup=None, weight_decay=None, label_smoothing=None, ema=None, grad_clip=None, augment=None,
          rrc_scale=None, normalize=None, init=None, model_kwargs=None, subset=None, val_split=None, recipe=None,
          seed=None, device=None, amp=None, fp32_precision=None, channels_last=None, compile=None, out=None,
          name=None, resume=None, progress=None, quiet=None, tensorboard=None, tta=None, tta_below=None, budget=None,
          sync_bn=None, pretrained=None, freeze_backbone=None, head_lr_mult=None, val_fraction=None, resize=None,
          data_cache=None, cache_dir=None, decode_workers=None, strict_data=None, progressive_size=None,
          progressive_fraction=None, eval_every=None):
    """Train a model: ``moderncnn.train(model="resnet18", dataset="cifar10", epochs=5)`` or
    ``moderncnn.train(TrainConfig(...))``. The keyword options are :class:`TrainConfig`'s fields, the command
    line's flags (None: the recipe decides); ``explicit`` names fields the recipe must not change; ``callbacks``
    are :class:`Callback` objects. Returns a ``RunResult``; the run directory holds config.json, metrics.csv, the
    plots, report.md, last.pt and, with a validation set, best.pt."""
    # Written out (a test checks it against TrainConfig) so that editors and help() show every option.
    options = {k: v for k, v in locals().items() if k not in ("config", "explicit", "callbacks") and v is not None}
    from .training.trainer import train as _train
    return _train(config, explicit, callbacks, **options)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moderncnn' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
