"""What a training run has done so far, and how it goes into a checkpoint and comes back out of one."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from ..runs import FORMAT_VERSION, EpochRecord, ModelSpec, TrainConfig, load_model_state
from .distributed import DistInfo, all_reduce_sum
from .precision import ScaledBackward

__all__ = ["EpochTotals", "TrainState"]


@dataclass
class EpochTotals:
    """Running sums of the epoch being trained, kept on the training device (read once, at its end)."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: torch.Tensor
    seconds: float = 0.0  # training time of the epoch before this process resumed it
    skipped: Optional[torch.Tensor] = None  # steps the float16 gradient scaler skipped

    @classmethod
    def zeros(cls, device: torch.device) -> "EpochTotals":
        return cls(torch.zeros((), dtype=torch.float64, device=device), torch.zeros((), dtype=torch.int64, device=device),
                   torch.zeros((), dtype=torch.int64, device=device), 0.0,
                   torch.zeros((), dtype=torch.int64, device=device))

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
            skipped: Optional[torch.Tensor] = None) -> None:
        loss = loss.detach().double()
        if skipped is not None:  # a step the scaler skipped may have a non-finite loss: not part of the mean
            loss = torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))
            self.skipped += skipped
        self.loss_sum += loss * labels.numel()
        self.correct += (logits.argmax(1) == labels).sum()
        self.seen += labels.numel()

    def reduce(self, info: DistInfo) -> None:
        """Sum over every process (in place); every process skips the same steps, so those are not summed."""
        for t in (self.loss_sum, self.correct, self.seen):
            all_reduce_sum(t, info)

    def to_dict(self, seconds: float) -> Dict[str, Any]:
        return {"loss_sum": self.loss_sum.cpu(), "correct": self.correct.cpu(), "seen": self.seen.cpu(),
                "seconds": seconds, "skipped": self.skipped.cpu()}

    @classmethod
    def from_dict(cls, data: Dict[str, Any], device: torch.device) -> "EpochTotals":
        skipped = data.get("skipped")
        return cls(data["loss_sum"].to(device), data["correct"].to(device), data["seen"].to(device),
                   float(data["seconds"]), (skipped if skipped is not None
                                            else torch.zeros((), dtype=torch.int64)).to(device))


@dataclass
class TrainState:
    """The objects a run trains and where it is: ``epoch`` is the epoch under way (0-based) and ``step`` the
    steps of it done; ``history`` the finished epochs; ``best_val_acc``/``best_epoch`` the selection so
    far (validation accuracy only); ``partial`` and ``loader_rng`` an interrupted epoch's sums and its
    augmentation generator, to resume it exactly."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: Optional[nn.Module] = None
    backward: ScaledBackward = field(default_factory=ScaledBackward)  # holds the float16 gradient scaler
    precision: str = "off"  # what the run computes in, in --amp's words (bf16, fp16, off)
    epoch: int = 0
    step: int = 0
    history: List[EpochRecord] = field(default_factory=list)
    best_val_acc: Optional[float] = None
    best_epoch: Optional[int] = None
    partial: Optional[Dict[str, Any]] = None
    loader_rng: Optional[torch.Tensor] = None
    done: bool = False  # set by the last epoch, before its on_epoch_end
    final_predictions: Optional[list] = field(default=None, repr=False)  # [predictions, probabilities], not saved

    @property
    def train_seconds(self) -> float:
        return sum(r.seconds for r in self.history)

    def select(self, record: EpochRecord) -> bool:
        """Keep ``record``'s epoch as the chosen one if its validation accuracy is the best so far."""
        if record.val_acc is None or (self.best_val_acc is not None and record.val_acc <= self.best_val_acc):
            return False
        self.best_val_acc, self.best_epoch = record.val_acc, record.epoch
        return True

    def to_checkpoint(self, spec: ModelSpec, config: TrainConfig, device: torch.device,
                      training: bool = True, data_fingerprint: Optional[dict] = None) -> Dict[str, Any]:
        """Plain data for :func:`~moderncnn.checkpoint.save_checkpoint`; ``training=False`` leaves out what
        only resuming needs (optimizer and schedule): the form of best.pt."""
        schedule = self.scheduler.state_dict()
        schedule["lr_lambdas"] = [None] * len(schedule.get("lr_lambdas", []))  # the plan rebuilds its function
        out = {"format_version": FORMAT_VERSION, **spec.to_dict(), "config": dataclasses.asdict(config),
               "model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
               "epoch": self.epoch, "step": self.step, "history": [dataclasses.asdict(r) for r in self.history],
               "best_val_acc": self.best_val_acc, "best_epoch": self.best_epoch, "partial": self.partial,
               "loader_rng": self.loader_rng, "precision": self.precision, "scaler": self.backward.state_dict(),
               "data_fingerprint": data_fingerprint,
               "rng": {"torch": torch.get_rng_state(),
                       "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
        if training:
            out.update(optimizer=self.optimizer.state_dict(), scheduler=schedule)
        return out

    @classmethod
    def from_checkpoint(cls, checkpoint: Dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler, ema: Optional[nn.Module], device: torch.device,
                        source: str = "checkpoint", backward: Optional[ScaledBackward] = None,
                        precision: str = "off") -> "TrainState":
        """Load a checkpoint's weights, optimizer, schedule position, EMA, gradient scaler and RNG into the
        given objects and return where the run stood."""
        backward = backward if backward is not None else ScaledBackward()
        load_model_state(model, checkpoint, source)
        backward.load_state_dict(checkpoint.get("scaler"))
        optimizer.load_state_dict(checkpoint["optimizer"])
        schedule = dict(checkpoint["scheduler"])
        schedule["lr_lambdas"] = [None] * len(schedule.get("lr_lambdas", []))  # the plan's length is its own
        scheduler.load_state_dict(schedule)
        if ema is not None and checkpoint.get("ema") is not None:
            ema.load_state_dict(checkpoint["ema"])
        epoch = int(checkpoint["epoch"])
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
        return cls(model, optimizer, scheduler, ema, backward, precision, epoch=epoch,
                   step=int(checkpoint.get("step", 0)),
                   history=[EpochRecord.from_row(r) for r in checkpoint.get("history", [])][:epoch],
                   best_val_acc=checkpoint.get("best_val_acc"), best_epoch=checkpoint.get("best_epoch"),
                   partial=checkpoint.get("partial"), loader_rng=checkpoint.get("loader_rng"))
