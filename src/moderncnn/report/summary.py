"""``summary(model, input_size)``: layer by layer output shapes, parameters, FLOPs and activation memory.

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` (one multiply-add = 2 FLOPs; the
convention of the PyTorch counter, so MACs are half). Activation memory of a row is the size of the
tensors it outputs; the total is the sum over leaf layers -- roughly what a training step keeps for the
backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["SummaryRow", "ModelSummary", "summary", "count_parameters", "human"]


@dataclass
class SummaryRow:
    name: str
    type: str
    depth: int
    output_shape: Tuple[int, ...]
    params: int
    flops: int
    activation_bytes: int


@dataclass
class ModelSummary:
    model_name: str
    input_size: Tuple[int, ...]
    rows: List[SummaryRow]
    total_params: int
    trainable_params: int
    total_flops: int
    activation_bytes: int
    output_shape: Tuple[int, ...] = field(default=())

    def as_rows(self) -> List[dict]:
        return [row.__dict__.copy() for row in self.rows]

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def table(self) -> str:
        header = ("Layer", "Type", "Output shape", "Params", "FLOPs", "Act. mem")
        lines = [
            ("  " * (r.depth - 1) + r.name, r.type, "x".join(map(str, r.output_shape)), f"{r.params:,}",
             human(r.flops), human(r.activation_bytes, "B", 1024))
            for r in self.rows
        ]
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]

        def fmt(cols):
            return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))

        rule = "-" * len(fmt(header))
        out = [f"{self.model_name}  input {'x'.join(map(str, self.input_size))}", rule, fmt(header), rule]
        out += [fmt(line) for line in lines]
        out += [rule,
                f"Total params: {self.total_params:,} (trainable {self.trainable_params:,})",
                f"FLOPs per forward: {human(self.total_flops)} ({self.total_flops:,}; multiply-add = 2)",
                f"Activation memory (forward, leaf outputs): {human(self.activation_bytes, 'B', 1024)}",
                f"Output shape: {'x'.join(map(str, self.output_shape))}"]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


def human(value: float, unit: str = "", base: int = 1000, spec: str = "") -> str:
    """``value`` with an SI prefix: 2 decimals (whole numbers below ``base``), or ``spec`` for all."""
    for prefix in ("", "K", "M", "G", "T"):
        if abs(value) < base or prefix == "T":
            return f"{value:{spec or ('.0f' if prefix == '' else '.2f')}}{prefix}{unit}"
        value /= base
    return str(value)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _tensor_bytes(out) -> Tuple[int, Tuple[int, ...]]:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size(), tuple(out.shape)
    if isinstance(out, (tuple, list)):
        total, shape = 0, ()
        for item in out:
            b, s = _tensor_bytes(item)
            total += b
            shape = shape or s
        return total, shape
    return 0, ()


def _is_transparent(module: nn.Module) -> bool:
    # Plain Sequential containers (a model's "features", a ResNet stage) only group layers: their
    # children are listed in their place, so depth 1 reads block by block, as d2l prints networks.
    return type(module) is nn.Sequential


@torch.no_grad()
def summary(model: nn.Module, input_size: Sequence[int] = (1, 1, 96, 96), depth: Optional[int] = None,
            device: Optional[torch.device] = None) -> ModelSummary:
    """Trace one forward pass of ``model`` on zeros of ``input_size`` and describe every layer.

    Args:
        model: any ``nn.Module`` taking one image batch.
        input_size: ``(N, C, H, W)``; a 3-tuple ``(C, H, W)`` means batch 1.
        depth: list modules down to this nesting depth (plain ``nn.Sequential`` containers do not count
            as a level); ``None`` lists all.
    """
    input_size = tuple(int(s) for s in input_size)
    if len(input_size) == 3:
        input_size = (1, *input_size)
    if len(input_size) != 4:
        raise ValueError(f"input_size must be (N, C, H, W) or (C, H, W), got {input_size}")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    depths: Dict[str, int] = {"": 0}
    records: Dict[str, SummaryRow] = {}
    order: List[str] = []
    hooks = []

    named = dict(model.named_modules())
    for name, module in named.items():
        if name == "":
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        parent_depth = depths[parent]
        if parent and _is_transparent(named[parent]):
            depths[name] = parent_depth
        else:
            depths[name] = parent_depth + 1

        def hook(mod, inputs, output, name=name):
            nbytes, shape = _tensor_bytes(output)
            if name not in records:
                order.append(name)
            records[name] = SummaryRow(name, type(mod).__name__, depths[name], shape,
                                       sum(p.numel() for p in mod.parameters()), 0, nbytes)

        hooks.append(module.register_forward_hook(hook))

    was_training = model.training
    model.eval()
    x = torch.zeros(input_size, device=device)
    try:
        with FlopCounterMode(display=False) as counter:
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    flop_counts = counter.get_flop_counts()
    root = type(model).__name__
    for name, row in records.items():
        row.flops = int(sum(flop_counts.get(f"{root}.{name}", {}).values()))
    leaves = {n for n, m in named.items() if n and next(m.children(), None) is None}
    activation = sum(records[n].activation_bytes for n in order if n in leaves)
    rows = [records[n] for n in order
            if not _is_transparent(named[n]) and not isinstance(named[n], nn.Identity) and (depth is None or records[n].depth <= depth)]
    _, out_shape = _tensor_bytes(out)
    return ModelSummary(
        model_name=getattr(model, "model_name", root),
        input_size=input_size,
        rows=rows,
        total_params=count_parameters(model),
        trainable_params=count_parameters(model, trainable_only=True),
        total_flops=int(counter.get_total_flops()),
        activation_bytes=activation,
        output_shape=out_shape,
    )
