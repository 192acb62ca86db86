"""Model registry: ``register_model`` / ``create_model`` / ``list_models`` (timm's pattern).

The family modules register their constructors when they are imported; ``moderncnn.models`` imports them all,
and the registry imports none (a family imports the registry, not the other way round)."""
from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
from typing import Callable, Dict, Iterable, List, Optional, Union

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


def _patterns(patterns: Union[str, Iterable[str]]) -> List[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns)


def list_models(filter: Union[str, Iterable[str]] = "", exclude_filters: Union[str, Iterable[str]] = (),
                pretrained: bool = False) -> List[str]:
    """Registered model names, sorted, as timm's ``list_models`` takes its arguments.

    Args:
        filter: shell-style pattern(s), e.g. ``"densenet*"``; a name matching any is kept ("" keeps all).
        exclude_filters: pattern(s) whose matches are left out, e.g. ``"*_d2l"``.
        pretrained: keep only the models with ImageNet weights available through torchvision.
    """
    keep, drop = [p for p in _patterns(filter) if p], _patterns(exclude_filters)
    names = sorted(n for n in _ENTRYPOINTS if (not keep or any(fnmatch.fnmatchcase(n, p) for p in keep))
                   and not any(fnmatch.fnmatchcase(n, p) for p in drop if p))
    if pretrained:
        from .pretrained import has_pretrained
        names = [n for n in names if has_pretrained(n)]
    return names


def is_model(name: str) -> bool:
    return name in _ENTRYPOINTS


def _default_argument(name: str, argument: str, fallback: int) -> int:
    """The default a model's constructor gives ``argument`` (10 classes for the CIFAR networks, one
    channel for the Fashion-MNIST ones), or ``fallback`` where it has none."""
    parameter = inspect.signature(_ENTRYPOINTS[name]).parameters.get(argument)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return fallback
    return parameter.default


def create_model(name: str, pretrained=False, *, num_classes: Optional[int] = None, in_chans: Optional[int] = None,
                 weights=None, **kwargs) -> nn.Module:
    """Build a registered model, called as timm's ``create_model`` is (``pretrained`` second, the rest by keyword).

    Args:
        name: registered name, e.g. ``"densenet121"`` (see :func:`list_models`).
        pretrained: ``True`` for torchvision's default ImageNet weights, a torchvision weights name
            (``"IMAGENET1K_V2"``, ``"ResNet50_Weights.IMAGENET1K_V2"``), or a path to local weights (a state dict,
            a moderncnn checkpoint or a ``.safetensors`` file).
        num_classes: size of the classifier output; ``None`` keeps the model's own default (1000 for
            the ImageNet networks, 10 for the CIFAR and Fashion-MNIST ones).
        in_chans: number of input channels (1 for Fashion-MNIST/MNIST, 3 for RGB); ``None`` keeps the
            model's own default.
        weights: torchvision's spelling of ``pretrained``: ``"DEFAULT"``, a weights name or enum member
            (``ResNet50_Weights.DEFAULT``), or a path.
        **kwargs: passed to the model's constructor (``small_input``, ``drop_rate``, ...).
    """
    if isinstance(pretrained, int) and not isinstance(pretrained, bool):
        raise TypeError(f"create_model({name!r}, {pretrained}): the second argument is pretrained (timm's order); "
                        f"pass num_classes={pretrained}")
    if weights is not None:
        if pretrained is not False:
            raise TypeError("create_model takes pretrained= or weights= (torchvision's word for it), not both")
        pretrained = weights
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
