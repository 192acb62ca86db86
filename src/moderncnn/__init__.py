"""moderncnn: the modern CNN family (AlexNet, VGG, NiN, GoogLeNet, ResNet, DenseNet) by name --
see it, train it, compare it, export it.

The names below load on first use: ``import moderncnn.models`` builds models without loading the trainer.
"""
import importlib
import importlib.metadata

try:  # one source: the version pyproject.toml gives the installed package
    __version__ = importlib.metadata.version("moderncnn")
except importlib.metadata.PackageNotFoundError:  # the source tree on sys.path, not installed
    __version__ = "0+unknown"

# name -> the module that defines it
_EXPORTS = {
    "create_model": "moderncnn.models", "list_models": "moderncnn.models", "register_model": "moderncnn.models",
    "UnknownModelError": "moderncnn.models", "InputTooSmallError": "moderncnn.models",
    "ImageClassifier": "moderncnn.models",
    "optimize_for_inference": "moderncnn.models.inference", "summary": "moderncnn.report.summary",
    "TrainConfig": "moderncnn.runs", "load_model": "moderncnn.runs", "load_run": "moderncnn.runs",
    "Callback": "moderncnn.train.callbacks", "show_run": "moderncnn.report.notebook",
    "lr_find": "moderncnn.train.lr_find",
}

__all__ = ["__version__", "train", *_EXPORTS]


def __getattr__(name: str):
    if name == "train":  # the package moderncnn.train, callable as the function train()
        return importlib.import_module("moderncnn.train")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moderncnn' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
