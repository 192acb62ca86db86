"""Training runs end to end on tiny generated data: the run directory, the report, a non-finite loss."""
import csv
import json

import pytest
import torch
from PIL import Image

import moderncnn
from moderncnn.runs import METRIC_FIELDS
from moderncnn.training import Callback, NonFiniteLossError, load_checkpoint

from helpers import tiny

RUN_FILES = ["config.json", "metrics.csv", "summary.json", "curves.png", "predictions.png", "confusion.png",
             "report.md", "last.pt"]


def test_end_to_end_run_directory(data_dir, tmp_path):
    result = moderncnn.train(**tiny(data_dir, tmp_path))
    run = tmp_path / "run"
    for name in RUN_FILES:
        assert (run / name).is_file() and (run / name).stat().st_size > 0, name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["config"]["model"] == "densenet_bc_fmnist" and cfg["seed"] == 3
    assert {"python", "torch", "moderncnn", "device"} <= set(cfg["versions"])
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == METRIC_FIELDS and len(rows) == 2
    assert float(rows[-1]["test_acc"]) == pytest.approx(result.final_acc, abs=1e-5)
    assert not (run / "best.pt").exists() and result.chosen_epoch is None  # no validation set: nothing chosen
    assert rows[-1]["val_acc"] == "" and rows[-1]["format_version"] == "3"
    assert result.final_acc > 0.3  # learnable squares: well above chance (0.1) after 2 short epochs
    for png in ("curves.png", "predictions.png", "confusion.png"):
        with Image.open(run / png) as img:
            assert img.size[0] > 300 and img.size[1] > 200
    report = (run / "report.md").read_text()
    assert "densenet_bc_fmnist" in report and "![curves](curves.png)" in report and "FLOPs" in report
    assert f"{result.final_acc:.4f}" in report
    assert "EMA weights" not in report and "No best.pt" in report
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 2 and state["model_name"] == "densenet_bc_fmnist"
    model = moderncnn.load_model(run)
    assert not model.training and model.classes == [str(i) for i in range(10)]


def test_ema_run_says_its_test_figures_are_the_averaged_weights(data_dir, tmp_path):
    moderncnn.train(**tiny(data_dir, tmp_path, epochs=1, ema=0.9))
    report = (tmp_path / "run" / "report.md").read_text()
    assert "EMA weights (decay 0.9)" in report and "EMA 0.9" in report


def test_alternating_flip_run_names_it_in_the_report(data_dir, tmp_path):
    moderncnn.train(**tiny(data_dir, tmp_path, epochs=1, augment="crop+altflip"))
    report = (tmp_path / "run" / "report.md").read_text()
    assert "augmentation crop+altflip (alternating flip)" in report


class NanLossAtStep(Callback):
    """Makes the model's loss hook return NaN at the n-th training step (1-based)."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def on_train_start(self, run, state):
        contract_loss = run.model.loss

        def loss(outputs, target, criterion):
            self.calls += 1
            logits, value = contract_loss(outputs, target, criterion)
            return logits, value * float("nan") if self.calls == self.n else value

        run.model.loss = loss


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at epoch 2, step 3"):
        moderncnn.train(**tiny(data_dir, tmp_path, epochs=3), callbacks=[NanLossAtStep(9)])
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_huge_learning_rate_is_reported(data_dir, tmp_path):
    with pytest.raises(NonFiniteLossError, match="learning rate"):
        moderncnn.train(**tiny(data_dir, tmp_path, lr=1e12, epochs=1, label_smoothing=0.0))


def test_d2l_recipe_runs_with_xavier_and_no_augmentation(data_dir, tmp_path):
    result = moderncnn.train(**tiny(data_dir, tmp_path, model="densenet_d2l", recipe="d2l", epochs=1,
                                    image_size=32, lr=None, batch_size=None))
    cfg = result.config
    assert cfg.init == "xavier" and cfg.augment == "none" and cfg.batch_size == 256 and cfg.momentum == 0.0
    assert cfg.image_size == 32  # explicit flag beats the recipe's 96


def test_image_too_small_for_model(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"resnet18 needs inputs of at least 32x32 .* --image-size 32"):
        moderncnn.train(**tiny(data_dir, tmp_path, model="resnet18"))
