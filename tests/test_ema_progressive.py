"""The EMA warm-up and progressive resizing."""
import csv

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

import moderncnn
from moderncnn.training.config import train_side
from moderncnn.training.optim import ema_warmup_fn

from helpers import make_mnist


def test_ema_warmup_matches_the_closed_form_and_copies_integer_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = AveragedModel(model, multi_avg_fn=ema_warmup_fn(0.9), use_buffers=True)
    expected = None
    for n in range(30):
        with torch.no_grad():
            model[0].weight.normal_()
        model(torch.randn(4, 3))  # training mode: BatchNorm counts a batch
        w = model[0].weight.detach().clone()
        if expected is None:
            expected = w  # the first update copies the model
        else:
            decay = min(0.9, (1 + n) / (10 + n))  # n updates done before this one
            expected = decay * expected + (1 - decay) * w
        ema.update_parameters(model)
    torch.testing.assert_close(ema.module[0].weight, expected)
    assert int(ema.module[1].num_batches_tracked) == 30
    # warm-up: after the second update the average is mostly the new weights, not the first (initial) ones
    early = AveragedModel(model, multi_avg_fn=ema_warmup_fn(0.999), use_buffers=True)
    first = model[0].weight.detach().clone()
    early.update_parameters(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    early.update_parameters(model)
    torch.testing.assert_close(early.module[0].weight, first + 1 - 2 / 11)


def test_progressive_sides_grow_in_four_pixel_steps_to_the_full_size():
    sides = [train_side(e, 33, 32, 24, 0.7) for e in range(33)]
    assert sides == [24] * 12 + [28] * 11 + [32] * 10
    assert [train_side(e, 10, 224, 160, 0.5) for e in range(10)] == [160, 172, 184, 196, 208, 224, 224, 224, 224,
                                                                      224]
    assert [train_side(e, 4, 32, 0, 0.7) for e in range(4)] == [32] * 4  # off
    assert [train_side(e, 4, 32, 40, 0.7) for e in range(4)] == [32] * 4  # never above the full size


class RecordInputSides(moderncnn.Callback):
    """(training?, side) of every batch the trained and the evaluated model see."""

    def __init__(self):
        self.sides = []

    def on_train_start(self, run, state):
        for model in {run.model, run.eval_model}:
            model.register_forward_pre_hook(lambda m, inputs: self.sides.append((m.training, inputs[0].shape[-1])))


def test_progressive_run_trains_small_then_full_and_records_the_sides(tmp_path):
    data = make_mnist(tmp_path / "data", n_train=256, n_test=64, learnable=True)
    recorder = RecordInputSides()
    result = moderncnn.train(dataset="mnist", data_dir=str(data), model="densenet_bc_fmnist", epochs=3,
                             batch_size=64, out=str(tmp_path), name="run", progress=False, augment="none",
                             progressive_size=20, progressive_fraction=0.7, ema=0.9, callbacks=[recorder])
    sides = recorder.sides
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["train_size"]) for r in rows] == [20, 24, 28]
    train_sides = [side for training, side in sides if training]
    assert train_sides == [20] * 4 + [24] * 4 + [28] * 4  # 256 / 64 = 4 steps per epoch
    assert {side for training, side in sides if not training} == {28}  # the test set at full size
    assert result.final_acc > 0.2
    report = (tmp_path / "run" / "report.md").read_text()
    assert "progressive resizing from 20x20 to 28x28 over the first 70% of the epochs" in report
    assert "(at 20x20) |" in report and "(at 24x24) |" in report and "(at 28x28)" not in report


def test_progressive_size_below_the_models_minimum_is_refused(tmp_path):
    data = make_mnist(tmp_path / "data", n_train=64, n_test=32)
    with pytest.raises(ValueError, match=r"resnet18 needs inputs of at least 32x32.*--progressive-size 16"):
        moderncnn.train(dataset="mnist", data_dir=str(data), model="resnet18", image_size=32, epochs=1,
                        batch_size=32, out=str(tmp_path), name="run", progress=False, progressive_size=16)
    with pytest.raises(ValueError, match="progressive_fraction"):
        moderncnn.train(dataset="mnist", data_dir=str(data), epochs=1, out=str(tmp_path), name="r2",
                        progress=False, progressive_size=20, progressive_fraction=0)


def test_resume_of_a_checkpoint_from_before_progressive_resizing(tmp_path):
    from moderncnn.training import load_checkpoint
    from moderncnn.checkpoint import save_checkpoint
    data = make_mnist(tmp_path / "data", n_train=128, n_test=32, learnable=True)
    moderncnn.train(dataset="mnist", data_dir=str(data), epochs=1, batch_size=64, out=str(tmp_path), name="run",
                    progress=False, augment="none")
    last = tmp_path / "run" / "last.pt"
    state = load_checkpoint(last)
    for key in ("progressive_size", "progressive_fraction"):  # what an older moderncnn wrote
        del state["config"][key]
    state.pop("format", None)
    save_checkpoint(state, last)
    resumed = moderncnn.train(resume=str(tmp_path / "run"), epochs=2, progress=False)
    assert [r.train_size for r in resumed.history] == [28, 28]
    assert resumed.config.progressive_size == 0
