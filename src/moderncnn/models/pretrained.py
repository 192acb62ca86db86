"""ImageNet weights through torchvision's own weights registry (its URLs, its SHA-256 file names, torch.hub's
cache and hash check), loaded with ``weights_only=True``, then adapted to ``num_classes`` and ``in_chans``.

* a different ``num_classes`` gets a freshly initialised classifier;
* ``in_chans=1`` sums the first convolution's RGB filters (timm's rule: a grey image is the sum of its
  channels' evidence); other counts repeat the RGB filters and rescale by 3/in_chans;
* ``pretrained="file.pth"`` loads a local state dict (torchvision layout, or a moderncnn checkpoint).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Callable, Dict, Optional
from urllib.error import URLError

import torch
from torch import nn

from .layers import replace_submodule

__all__ = ["has_pretrained", "create_pretrained", "weights_url", "freeze_backbone", "PretrainedError",
           "adapt_first_conv", "keep_frozen_norms_in_eval"]

# moderncnn name -> torchvision builder name (the same network, the same state-dict keys).
_TORCHVISION = {n: n for n in ["alexnet", "vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn",
                               "vgg19_bn", "googlenet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                               "densenet121", "densenet161", "densenet169", "densenet201"]}


class PretrainedError(ValueError):
    """Weights that cannot be fetched, verified or loaded."""


def has_pretrained(name: str) -> bool:
    return name in _TORCHVISION


_TAG = re.compile(r"^(?:[A-Za-z0-9]+_Weights\.)?(?:DEFAULT|[A-Z0-9]+(?:_[A-Z0-9]+)+)$")


def weights_tag(pretrained) -> Optional[str]:
    """The torchvision weights that ``pretrained`` names ("DEFAULT", "IMAGENET1K_V2"), or None for a path.
    ``True`` and torchvision's own enum members (``ResNet50_Weights.DEFAULT``) count as names."""
    if pretrained is True:
        return "DEFAULT"
    if hasattr(pretrained, "url") and hasattr(pretrained, "transforms"):  # a torchvision WeightsEnum member
        return pretrained.name
    text = str(pretrained)
    if _TAG.match(text) and not Path(text).exists():
        return text.rsplit(".", 1)[-1]
    return None


def _weights(name: str, tag: str = "DEFAULT"):
    from torchvision.models import get_model_weights
    choices = get_model_weights(_TORCHVISION[name])
    try:
        return choices[tag]
    except KeyError:
        raise PretrainedError(f"{name} has no torchvision weights {tag!r}; it has: DEFAULT, "
                              f"{', '.join(w.name for w in choices)}") from None


def weights_url(name: str, tag: str = "DEFAULT") -> str:
    """Where torchvision publishes ``name``'s ImageNet weights (``tag``: "DEFAULT" or a weights name).
    ``$MODERNCNN_WEIGHTS_MIRROR`` replaces the host part (for a local mirror)."""
    url = _weights(name, tag).url
    mirror = os.environ.get("MODERNCNN_WEIGHTS_MIRROR")
    if mirror:
        url = mirror.rstrip("/") + "/" + url.rsplit("/", 1)[1]
    return url


def preprocessing(name: str, tag: str = "DEFAULT") -> Dict:
    """The input pipeline the weights were trained with (resize, crop, mean, std)."""
    t = _weights(name, tag).transforms()
    return {"resize": int(t.resize_size[0]), "crop": int(t.crop_size[0]), "mean": list(t.mean), "std": list(t.std)}


def _download(name: str, tag: str = "DEFAULT") -> Dict[str, torch.Tensor]:
    url = weights_url(name, tag)
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True,
                                                  weights_only=True)
    except RuntimeError as exc:
        if "hash" in str(exc):
            raise PretrainedError(f"{url}: checksum mismatch ({exc}); the download was not kept") from None
        raise PretrainedError(f"{url}: could not load the weights ({exc})") from None
    except (URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PretrainedError(
            f"could not download {url} ({reason}). Offline? Put the file by hand at "
            f"{hub_dir / url.rsplit('/', 1)[1]} (or pass pretrained='path/to/file.pth')") from None


def _load_local(path) -> Dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"{path}: no such weights file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            return load_file(str(path))
        except ImportError:
            raise PretrainedError(f"{path}: reading safetensors needs the safetensors package") from None
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise PretrainedError(f"{path}: cannot be read as safetensors ({str(exc).splitlines()[0]})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, truncated zip, ...
        raise PretrainedError(f"{path}: cannot be read as a state dict ({str(exc).splitlines()[0]})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a moderncnn checkpoint
    if not isinstance(state, dict):
        raise PretrainedError(f"{path}: not a state dict")
    return state


@torch.no_grad()
def adapt_first_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """RGB filters -> ``in_chans`` filters (sum for 1; repeat and rescale by 3/in_chans otherwise)."""
    if in_chans == weight.shape[1]:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = math.ceil(in_chans / weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def _adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    conv = model.get_submodule(model.first_conv)
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None)
    new.weight.data.copy_(adapt_first_conv(conv.weight.data, in_chans))
    if conv.bias is not None:
        new.bias.data.copy_(conv.bias.data)
    replace_submodule(model, model.first_conv, new)
    model.in_chans = in_chans
    model.min_input_size = (in_chans, *model.min_input_size[1:])
    model.default_input_size = (in_chans, *model.default_input_size[1:])
    if getattr(model, "transform_input", False):
        model.transform_input = False


def create_pretrained(name: str, build: Callable[..., nn.Module], pretrained, num_classes: int = 1000,
                      in_chans: int = 3, **kwargs) -> nn.Module:
    """``build``'s model with ImageNet (``pretrained``: True or a torchvision weights name, see
    :func:`weights_tag`) or local weights, adapted through the model contract: a new classifier
    (``reset_classifier``) for another class count, and the first convolution (``first_conv``) for another
    channel count."""
    tag = weights_tag(pretrained)
    if tag is not None:
        if not has_pretrained(name):
            raise PretrainedError(f"no ImageNet weights for {name}; models with weights: "
                                  f"{', '.join(sorted(_TORCHVISION))}")
        if name == "googlenet" and in_chans == 3:
            kwargs.setdefault("transform_input", True)  # as torchvision builds it for these weights
        state = _download(name, tag)
        cfg = preprocessing(name, tag)
    else:
        state = _load_local(pretrained)
        cfg = None
    with torch.device("meta"):  # only its names: no memory, no initialisation cost
        probe = build(num_classes=num_classes, in_chans=in_chans, **kwargs)
    first, head = f"{probe.first_conv}.weight", f"{probe.classifier_name}.weight"
    source_chans = state[first].shape[1] if first in state else in_chans
    # The weights' own classifier size decides the model they load into; a different one is replaced below.
    source_classes = state[head].shape[0] if head in state else num_classes
    model = build(num_classes=source_classes, in_chans=source_chans, **kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PretrainedError(f"weights do not fit {name}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if source_classes != num_classes:
        model.reset_classifier(num_classes)
    if in_chans != source_chans:
        _adapt_first_conv(model, in_chans)
    if cfg is not None:
        if in_chans != 3:  # one grey channel stands for the mean of the RGB statistics
            cfg = dict(cfg, mean=[sum(cfg["mean"]) / 3] * in_chans, std=[sum(cfg["std"]) / 3] * in_chans)
        model.pretrained_cfg = cfg
    return model


def freeze_backbone(model: nn.Module) -> str:
    """Freeze everything but the head (``model.head_names``): no gradients, and BatchNorm layers kept in
    eval mode (their running statistics stay as trained). Returns a one-line description for the report."""
    head_names = list(model.head_names)
    prefixes = tuple(f"{h}." for h in head_names)
    frozen = trained = 0
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            trained += p.numel()
        else:
            p.requires_grad_(False)
            frozen += p.numel()
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not name.startswith(prefixes):
            m.moderncnn_frozen = True
    return f"classifier only ({', '.join(head_names)}): {trained:,} trained, {frozen:,} frozen"


def keep_frozen_norms_in_eval(model: nn.Module) -> None:
    """Call after ``model.train()``: frozen BatchNorms normalise with their stored statistics."""
    for m in model.modules():
        if getattr(m, "moderncnn_frozen", False):
            m.eval()
