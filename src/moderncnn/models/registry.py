"""Model registry: ``register_model`` / ``create_model`` / ``list_models`` (timm's pattern)."""
from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
from typing import Callable, Dict, List, Optional

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "is_model", "UnknownModelError"]

_ENTRYPOINTS: Dict[str, Callable[..., nn.Module]] = {}


class UnknownModelError(ValueError):
    """A model name that is not registered."""


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a public constructor under its function name.

    The constructor is wrapped so that the model it returns knows its registered name (used in error
    messages, summaries and checkpoints).
    """
    name = fn.__name__
    if name in _ENTRYPOINTS:
        raise ValueError(f"model {name!r} is registered twice")

    @functools.wraps(fn)
    def build(*args, **kwargs):
        model = fn(*args, **kwargs)
        model.model_name = name
        return model

    _ENTRYPOINTS[name] = build
    return build


def _ensure_registered() -> None:
    # The family modules register themselves on import; importing the package does it.
    from . import alexnet, vgg, nin, googlenet, resnet, csp, densenet  # noqa: F401


def list_models(pattern: str = "*", pretrained: bool = False) -> List[str]:
    """Registered model names matching a shell-style ``pattern``, sorted.

    ``pretrained=True`` keeps only the models with ImageNet weights available through torchvision.
    """
    _ensure_registered()
    names = sorted(n for n in _ENTRYPOINTS if fnmatch.fnmatchcase(n, pattern))
    if pretrained:
        from .pretrained import has_pretrained
        names = [n for n in names if has_pretrained(n)]
    return names


def is_model(name: str) -> bool:
    _ensure_registered()
    return name in _ENTRYPOINTS


def _default_argument(name: str, argument: str, fallback: int) -> int:
    """The default a model's constructor gives ``argument`` (10 classes for the CIFAR networks, one
    channel for the Fashion-MNIST ones), or ``fallback`` where it has none."""
    parameter = inspect.signature(_ENTRYPOINTS[name]).parameters.get(argument)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return fallback
    return parameter.default


def create_model(name: str, num_classes: Optional[int] = None, in_chans: Optional[int] = None, pretrained=False,
                 **kwargs) -> nn.Module:
    """Build a registered model.

    Args:
        name: registered name, e.g. ``"densenet121"`` (see :func:`list_models`).
        num_classes: size of the classifier output; ``None`` keeps the model's own default (1000 for
            the ImageNet networks, 10 for the CIFAR and Fashion-MNIST ones).
        in_chans: number of input channels (1 for Fashion-MNIST/MNIST, 3 for RGB); ``None`` keeps the
            model's own default.
        pretrained: ``True`` for torchvision's ImageNet weights, or a path to a local state dict.
        **kwargs: passed to the model's constructor (``small_input``, ``drop_rate``, ...).
    """
    _ensure_registered()
    if name not in _ENTRYPOINTS:
        close = difflib.get_close_matches(name, list(_ENTRYPOINTS), n=5, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} `moderncnn models` lists all {len(_ENTRYPOINTS)} models."
        )
    if num_classes is None:
        num_classes = _default_argument(name, "num_classes", 1000)
    if in_chans is None:
        in_chans = _default_argument(name, "in_chans", 3)
    if pretrained:
        from .pretrained import create_pretrained
        return create_pretrained(name, _ENTRYPOINTS[name], pretrained, num_classes=num_classes,
                                 in_chans=in_chans, **kwargs)
    return _ENTRYPOINTS[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
