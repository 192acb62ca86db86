"""The built-in callbacks: the console output, the progress bar, metrics.csv, the checkpoints, the report and the
non-finite-loss guard (the base class and the order of events are in :mod:`moderncnn.training.callback`).

Under torchrun every process calls the callbacks; the built-in ones that write or print run on rank 0
only (``run.is_main``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..checkpoint import save_checkpoint, save_tensors_atomic
from ..report.run import write_run_report
from ..runs import RunSummary, peak_memory_mb, write_config, write_metrics, write_summary
from .callback import Callback
from .loop import NonFiniteLossError, StepOutput, evaluate
from .state import TrainState

if TYPE_CHECKING:
    from .setup import TrainSetup

__all__ = ["NonFiniteGuard", "ProgressBar", "ConsoleLog", "MetricsLogger", "CheckpointSaver", "ReportWriter",
           "SCALER_BACKOFF_STEPS"]


# Under float16 a step with a non-finite loss is skipped by the gradient scaler, which halves its scale; after
# 16 halvings in a row the scale has backed off from 2**16 to 1, and a loss still not finite is not the scale's.
SCALER_BACKOFF_STEPS = 16


class NonFiniteGuard(Callback):
    """Stops the run at the first NaN or infinite loss, before anything saves the weights it produced.
    ``tolerate`` non-finite losses in a row are let pass (float16: the scaler skips those steps and leaves the
    weights alone). On CUDA the check of a step's loss waits for the next step (reading a loss waits for the
    GPU; one step of work stays in flight); evaluations check the outputs too (see ``evaluate``)."""

    def __init__(self, defer: bool = False, tolerate: int = 0):
        self.defer, self._unchecked = defer, None
        self.tolerate, self._in_a_row = tolerate, 0

    def _check(self, run, step: StepOutput) -> None:
        if torch.isfinite(step.loss):
            self._in_a_row = 0
            return
        self._in_a_row += 1
        if self._in_a_row > self.tolerate:
            raise NonFiniteLossError(
                f"loss is {step.loss.item()} at epoch {step.epoch + 1}, step {step.step + 1} (global step "
                f"{step.global_step + 1}){self._backed_off()}; stopped. The learning rate ({step.lr:.4g}) is "
                f"probably too high. The last good checkpoint is kept in {run.run_dir}.")

    def _backed_off(self) -> str:
        return f", {self._in_a_row} steps in a row after the float16 scale backed off" if self.tolerate else ""

    def on_step_end(self, run, state, step):
        if not self.defer:
            return self._check(run, step)
        if self._unchecked is not None:
            self._check(run, self._unchecked)
        self._unchecked = step

    def _flush(self, run) -> None:
        if self._unchecked is not None:
            unchecked, self._unchecked = self._unchecked, None
            self._check(run, unchecked)

    def on_epoch_end(self, run, state, record):
        self._flush(run)

    def on_interrupt(self, run, state, signum):
        self._flush(run)  # never save the weights of a non-finite step


class ProgressBar(Callback):
    """A tqdm bar per epoch with the running loss, accuracy and images/s (``tqdm.auto``: a widget in Jupyter)."""

    def __init__(self):
        self.bar = None

    def on_step_end(self, run, state, step):
        total = run.plan.steps_in(step.epoch)
        if self.bar is None:  # the epoch's first step (or the first after resuming)
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=step.step, unit="batch", leave=False, dynamic_ncols=True,
                            desc=f"epoch {step.epoch + 1}/{run.plan.epochs}")
        elif self.bar.total != total:  # a time budget's plan changed
            self.bar.total = total
            self.bar.set_description(f"epoch {step.epoch + 1}/{run.plan.epochs}")
        self.bar.update(1)
        if step.step % 10 == 0 or step.step == total - 1:
            seen = step.totals.seen.item()
            self.bar.set_postfix(loss=f"{step.totals.loss_sum.item() / seen:.4f}",
                                 acc=f"{step.totals.correct.item() / seen:.4f}",
                                 img_s=f"{seen * run.dist.world_size / max(step.seconds, 1e-9):.0f}")

    def _close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_epoch_end(self, run, state, record):
        self._close()

    def on_interrupt(self, run, state, signum):
        self._close()


class ConsoleLog(Callback):
    """The start line, one line per epoch, and the closing line (only that one when ``quiet``)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def on_train_start(self, run, state):
        if self.quiet:
            return
        cfg, info = run.cfg, run.info
        length = f"{cfg.epochs} epochs"
        if cfg.budget:
            from .config import BUDGET_MAX_EPOCHS
            length = (f"time budget {cfg.budget:.0f}s (epochs planned from measured times"
                      f"{f', at most {cfg.epochs}' if cfg.epochs < BUDGET_MAX_EPOCHS else ''})")
        side = info.spec.image_size
        growing = (f" (the first trained from {cfg.progressive_size}x{cfg.progressive_size} up)"
                   if 0 < cfg.progressive_size < side else "")
        val = f" / {info.val_images:,} val" if info.val_images else ""
        if info.data_storage == "disk":
            val += ", memory-mapped from the disk cache"
        print(f"{'resuming' if state.epoch or state.step else 'training'} {cfg.model} ({info.params:,} params, "
              f"{info.flops_per_image / 1e6:.1f} MFLOPs/image) on {cfg.dataset} ({info.train_images:,} train{val} / "
              f"{info.test_images:,} test, {side}x{side}) | recipe {cfg.recipe}: {cfg.describe_optimizer()}, "
              f"{cfg.schedule}, batch {cfg.batch_size}, {length}{growing} | "
              f"{run.device}{f' x{run.dist.world_size}' if run.dist.enabled else ''}, {info.precision}"
              f"{f', {run.allocator}' if run.allocator else ''} -> "
              f"{run.run_dir}", flush=True)

    def on_epoch_end(self, run, state, record):
        if self.quiet:
            return
        fraction = record.train_images / (run.plan.steps_per_epoch * run.train_loader.batch_size * run.dist.world_size)
        val = f"val acc {record.val_acc:.4f}  " if record.val_acc is not None else ""
        scores = (f"{val}test loss {record.test_loss:.4f} acc {record.test_acc:.4f}" if record.scored
                  else f"{'(test set not scored)':<27}")
        full = run.spec.image_size
        print(f"epoch {record.epoch:3d}/{run.plan.epochs}  train loss {record.train_loss:.4f} acc "
              f"{record.train_acc:.4f}  {scores}  lr {record.lr:.4g}  {record.seconds:.1f}s  "
              f"{record.images_per_second:.0f} img/s"
              f"{f'  (trained at {record.train_size}x{record.train_size})' if record.train_size != full else ''}"
              f"{f'  ({fraction:.0%} of the training set)' if fraction < 0.999 else ''}"
              f"{f'  ({record.skipped_steps} steps skipped by the fp16 scaler)' if record.skipped_steps else ''}",
              flush=True)
        if state.done and run.cfg.budget:
            done = f"{record.epoch - 1 + fraction:.2f}" if fraction < 0.999 else f"{record.epoch}"
            print(f"time budget of {run.cfg.budget:.0f}s: {state.train_seconds:.0f}s used by {done} "
                  f"epoch{'s' if record.epoch > 1 else ''}; stopping", flush=True)

    def on_train_end(self, run, state):
        final = state.history[-1].test_acc if state.history else 0.0
        chosen = (f", best.pt: epoch {state.best_epoch} (val acc {state.best_val_acc:.4f})"
                  if state.best_epoch else "")
        print(f"done: final test accuracy {final:.4f}{chosen}, {state.train_seconds:.0f}s; "
              f"report: {run.run_dir / 'report.md'}", flush=True)


class MetricsLogger(Callback):
    """config.json at the start, metrics.csv after every epoch."""

    def on_train_start(self, run, state):
        write_config(run.run_dir, run.info)

    def on_epoch_end(self, run, state, record):
        write_metrics(run.run_dir / "metrics.csv", state.history)

    def on_train_end(self, run, state):
        write_metrics(run.run_dir / "metrics.csv", state.history)  # a run finished from last.pt repairs it too


class CheckpointSaver(Callback):
    """last.pt after every epoch and on Ctrl-C/SIGTERM; best.pt whenever validation accuracy improves
    (runs without a validation set have none: their final weights are the model)."""

    def on_epoch_end(self, run, state, record):
        # best.pt first: last.pt names the best epoch only once best.pt holds it, so a crash between the two
        # leaves last.pt at the epoch before, which a resume trains again and saves in the same order.
        if state.best_epoch == record.epoch:
            save_checkpoint(state.to_checkpoint(run.spec, run.cfg, run.device, training=False,
                                                data_fingerprint=run.info.data_fingerprint), run.run_dir / "best.pt")
        self._save_last(run, state)

    def on_interrupt(self, run, state, signum):
        self._save_last(run, state)

    @staticmethod
    def _save_last(run, state):
        save_checkpoint(state.to_checkpoint(run.spec, run.cfg, run.device, data_fingerprint=run.info.data_fingerprint),
                        run.run_dir / "last.pt")
        run.saved = (f"epoch {state.epoch + 1}, step {state.step}" if state.step
                     else f"the end of epoch {state.epoch}")


class ReportWriter(Callback):
    """At the end: the final model's test predictions, summary.json, the plots and report.md."""

    def on_train_end(self, run, state):
        predictions, acc = state.final_predictions, state.history[-1].test_acc
        if predictions is None:  # the last evaluation ran sharded (torchrun): score the whole set here
            from ..data import Loader
            loader = run.test_loader
            whole = Loader(run.test_set, loader.batch_size, train=False, image_size=loader.image_size,
                           device=loader.device, mean=loader.mean_values, std=loader.std_values,
                           channels_last=loader.channels_last)
            _, acc, *predictions = evaluate(run.eval_model, whole, tta=int(run.cfg.tta or 0),
                                            tta_below=run.cfg.tta_below, amp_dtype=run.amp_dtype,
                                            return_predictions=True)
        preds, probs = predictions
        test = run.test_set
        # A fixed random sample (seed 0) for the prediction grid: image folders are sorted by class, so the
        # first 32 test images would all show one class.
        sample = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:32].sort().values
        true_prob = probs.gather(1, test.labels.view(-1, 1)).flatten()
        worst = torch.argsort(true_prob)[:16]  # the highest losses: -log p(true class)
        save_tensors_atomic({"labels": test.labels, "predictions": preds, "confidence": probs.max(1).values,
                    "true_prob": true_prob, "classes": list(test.classes),
                    "sample_images": test.images[sample].clone(), "sample_index": sample,
                             "worst_images": test.images[worst].clone(), "worst_index": worst, "test_acc": acc},
                            run.run_dir / "predictions.pt")
        write_summary(run.run_dir, _summary(run, state))
        write_run_report(run.run_dir)


def _summary(run: "TrainSetup", state: TrainState) -> RunSummary:
    history, cfg = state.history, run.cfg
    return RunSummary(model=cfg.model, dataset=cfg.dataset, recipe=cfg.recipe, final_acc=history[-1].test_acc,
                      train_seconds=state.train_seconds, epochs_done=len(history),
                      epochs_planned=len(history) if cfg.budget else cfg.epochs, params=run.info.params,
                      flops_per_image=run.info.flops_per_image,
                      images_per_second=sum(r.images_per_second for r in history) / len(history),
                      peak_memory_mb=peak_memory_mb(run.device), tta=int(cfg.tta or 0),
                      precision=run.info.precision, skipped_steps=sum(r.skipped_steps for r in history),
                      weights="best.pt" if state.best_epoch else "last.pt",
                      chosen_epoch=state.best_epoch, chosen_val_acc=state.best_val_acc)
