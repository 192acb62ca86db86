"""End-to-end training on tiny generated data: the run directory, resume, signals, faults, eval, predict."""
import csv
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import moderncnn
from moderncnn.checkpoint import save_checkpoint
from moderncnn.runs import METRIC_FIELDS, load_model_state
from moderncnn.training import (Callback, CheckpointError, NonFiniteLossError, TrainConfig, TrainingInterrupted,
                             load_checkpoint, resolve_config)

from helpers import CtrlCAtStep, make_mnist, tiny

RUN_FILES = ["config.json", "metrics.csv", "summary.json", "curves.png", "predictions.png", "confusion.png",
             "report.md", "last.pt"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_mnist(tmp_path_factory.mktemp("mnist"), n_train=384, n_test=128, learnable=True)


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


def test_resume_at_epoch_boundary_gives_same_result(data_dir, tmp_path, monkeypatch):
    straight = moderncnn.train(**tiny(data_dir, tmp_path / "a", epochs=2))
    with pytest.raises(TrainingInterrupted):  # at the last step of epoch 1 (384 / 64 = 6 steps)
        moderncnn.train(**tiny(data_dir, tmp_path / "b", epochs=2), callbacks=[CtrlCAtStep(6)])
    state = load_checkpoint(tmp_path / "b" / "run" / "last.pt")
    assert (state["epoch"], state["step"]) == (0, 6)
    resumed = moderncnn.train(resume=str(tmp_path / "b" / "run"), progress=False)
    for key in ("train_loss", "test_loss", "test_acc"):
        assert getattr(resumed.history[-1], key) == pytest.approx(getattr(straight.history[-1], key), rel=1e-5,
                                                                 abs=1e-6)
    a = load_checkpoint(tmp_path / "a" / "run" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "b" / "run" / "last.pt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    with open(tmp_path / "b" / "run" / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2]


def test_resume_extends_a_finished_run(data_dir, tmp_path):
    moderncnn.train(**tiny(data_dir, tmp_path, epochs=1))
    with pytest.raises(ValueError, match="already finished 1 epochs"):
        moderncnn.train(resume=str(tmp_path / "run"), progress=False)
    longer = moderncnn.train(resume=str(tmp_path / "run"), epochs=2, progress=False)
    assert [r.epoch for r in longer.history] == [1, 2]
    with pytest.raises(ValueError, match="already holds a run"):
        moderncnn.train(**tiny(data_dir, tmp_path, epochs=1))


def test_interrupt_mid_epoch_saves_and_resumes_exactly(data_dir, tmp_path, monkeypatch):
    straight = moderncnn.train(**tiny(data_dir, tmp_path / "a", epochs=2))
    with pytest.raises(TrainingInterrupted) as stop:  # the 8th step of 12: mid-way through epoch 2
        moderncnn.train(**tiny(data_dir, tmp_path / "b", epochs=2), callbacks=[CtrlCAtStep(8)])
    assert stop.value.exit_code == 130
    assert "resume with: moderncnn train --resume" in str(stop.value)
    state = load_checkpoint(tmp_path / "b" / "run" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 2)
    resumed = moderncnn.train(resume=str(tmp_path / "b" / "run"), progress=False)
    assert len(resumed.history) == 2
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert getattr(resumed.history[-1], key) == pytest.approx(getattr(straight.history[-1], key), rel=1e-5,
                                                                 abs=1e-6)


def test_a_signal_during_evaluation_stops_the_run_at_the_epochs_end(data_dir, tmp_path, monkeypatch):
    import moderncnn.training.loop as loop

    real_evaluate, calls = loop.evaluate, []

    def evaluate_then_sigterm(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGTERM)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate_then_sigterm)
    with pytest.raises(TrainingInterrupted, match="SIGTERM: stopped after epoch 1; saved") as stop:
        moderncnn.train(**tiny(data_dir, tmp_path, epochs=3))
    assert stop.value.exit_code == 143
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 0) and len(state["history"]) == 1
    assert state["history"][0]["test_acc"] is not None  # the evaluation it interrupted was finished
    resumed = moderncnn.train(resume=str(tmp_path / "run"), progress=False)
    assert [r.epoch for r in resumed.history] == [1, 2, 3]


def test_sigint_in_subprocess_exits_130_and_resumes(data_dir, tmp_path):
    cmd = [sys.executable, "-m", "moderncnn", "train", "--dataset", "mnist", "--data-dir", str(data_dir),
           "--epochs", "400", "--batch-size", "32", "--out", str(tmp_path), "--name", "sig", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "sig" / "metrics.csv"
    import time
    deadline = time.time() + 120
    while not metrics.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert metrics.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    # mid-epoch, or at the epoch's end when the signal came during its evaluation or checkpoint
    assert re.search(r"SIGINT: stopped (at|after) epoch", err), err
    assert f"moderncnn train --resume {tmp_path / 'sig'}" in err
    state = load_checkpoint(tmp_path / "sig" / "last.pt")
    assert state["epoch"] >= 1
    done = subprocess.run([sys.executable, "-m", "moderncnn", "train", "--resume", str(tmp_path / "sig"),
                           "--epochs", str(state["epoch"] + 1), "--no-progress"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "final test accuracy" in done.stdout


def test_sigterm_exits_143(data_dir, tmp_path):
    cmd = [sys.executable, "-m", "moderncnn", "train", "--dataset", "mnist", "--data-dir", str(data_dir),
           "--epochs", "400", "--batch-size", "32", "--out", str(tmp_path), "--name", "term", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    import time
    deadline = time.time() + 120
    while not (tmp_path / "term" / "config.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert load_checkpoint(tmp_path / "term" / "last.pt")["model_name"] == "densenet_bc_fmnist"


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


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    moderncnn.train(**tiny(data_dir, out, epochs=1, val_split=64))
    return out / "run"


def test_corrupt_truncated_and_malicious_checkpoints(trained_run, tmp_path):
    good = (trained_run / "best.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt checkpoint"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Payload()}, evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_of_another_architecture(trained_run):
    state = load_checkpoint(trained_run / "best.pt")
    other = moderncnn.create_model("resnet18", num_classes=10, in_chans=1)
    with pytest.raises(CheckpointError, match=r"trained with model 'densenet_bc_fmnist'.*does not fit 'resnet18'"):
        load_model_state(other, state)


def test_atomic_save_leaves_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind


def test_eval_cli_prints_accuracy(trained_run, data_dir, capsys):
    from moderncnn.cli import main
    assert main(["eval", str(trained_run)]) == 0
    out = capsys.readouterr().out
    state = load_checkpoint(trained_run / "best.pt")
    assert f"test accuracy: {state['history'][-1]['test_acc']:.4f}" in out


def test_predict_on_png_files(trained_run, tmp_path, capsys):
    from moderncnn.cli import main
    from moderncnn.data import load_dataset
    state = load_checkpoint(trained_run / "best.pt")
    test = load_dataset("mnist", root=state["config"]["data_dir"], split="test")
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(test.images[i, 0].numpy()).convert("RGB").save(p)  # RGB file: converted to grey
        paths.append(str(p))
    assert main(["predict", str(trained_run), *paths, "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(str(tmp_path)) for line in lines)
    model = moderncnn.load_model(trained_run)
    from moderncnn.predict import predict_files
    top = predict_files(str(trained_run), paths, top_k=1)
    with torch.no_grad():
        x = (test.images[:3].float() / 255 - state["normalization"]["mean"][0]) / state["normalization"]["std"][0]
        expected = model(x).argmax(1)
    assert [t[1][0][0] for t in top] == [model.classes[i] for i in expected]


def test_predict_unreadable_image(trained_run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    from moderncnn.predict import predict_files
    with pytest.raises(ValueError, match="bad.png: unreadable image"):
        predict_files(str(trained_run), [str(bad)])


def test_image_too_small_for_model(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"resnet18 needs inputs of at least 32x32 .* --image-size 32"):
        moderncnn.train(**tiny(data_dir, tmp_path, model="resnet18"))


def test_recipes_and_explicit_overrides():
    d2l = resolve_config(TrainConfig(recipe="d2l", model="alexnet_d2l"))
    assert (d2l.lr, d2l.batch_size, d2l.image_size, d2l.epochs) == (0.01, 128, 224, 10)
    assert d2l.momentum == 0.0 and d2l.weight_decay == 0.0 and d2l.augment == "none" and d2l.init == "xavier"
    dn = resolve_config(TrainConfig(recipe="d2l", model="densenet_d2l"))
    assert (dn.lr, dn.batch_size, dn.image_size) == (0.1, 256, 96)
    mine = resolve_config(TrainConfig(recipe="d2l", model="densenet_d2l", lr=0.3, epochs=2))
    assert (mine.lr, mine.epochs, mine.batch_size) == (0.3, 2, 256)
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve_config(TrainConfig(recipe="nope"))


def test_recipe_model_arguments_belong_to_the_recipes_model():
    recipe_kwargs = {"bn_size": 4, "stem_stride": 1, "stem_pool": True}
    best = resolve_config(TrainConfig(recipe="fmnist-best"))
    assert best.model == "densenet_bc_fmnist" and best.model_kwargs == recipe_kwargs
    assert (best.optimizer, best.muon_lr, best.lr) == ("muon", 0.05, 0.2)
    mine = resolve_config(TrainConfig(recipe="fmnist-best", model_kwargs={"bn_size": 3, "drop_rate": 0.1}))
    assert mine.model_kwargs == {"bn_size": 3, "stem_stride": 1, "stem_pool": True, "drop_rate": 0.1}  # user's win
    other = resolve_config(TrainConfig(recipe="fmnist-best", model="resnet18"))
    assert other.model_kwargs == {}
    assert resolve_config(TrainConfig(recipe="fmnist-best")).model_kwargs == recipe_kwargs  # recipe not consumed
    cifar = resolve_config(TrainConfig(recipe="cifar10"))
    assert cifar.model == "densenet_bc_cifar" and cifar.model_kwargs == {}
    assert cifar.amp == "auto" and cifar.eval_every == 5
    assert (cifar.optimizer, cifar.muon_lr, cifar.lr) == ("muon", 0.05, 0.2)
    gpu = resolve_config(TrainConfig(recipe="cifar10-gpu"))
    assert (gpu.model, gpu.optimizer, gpu.muon_lr, gpu.lr, gpu.epochs) == ("densenet_bc_100", "muon", 0.05, 0.4, 25)
    assert gpu.amp and gpu.channels_last and gpu.batch_size == 512
    # the registered default model has a 2k bottleneck; the recipe's 4k one has about twice the parameters
    small = moderncnn.create_model("densenet_bc_fmnist", num_classes=10, in_chans=1)
    paper = moderncnn.create_model("densenet_bc_fmnist", num_classes=10, in_chans=1, bn_size=4)
    assert small.features.denseblock1.denselayer1.conv1.out_channels == 32
    assert paper.features.denseblock1.denselayer1.conv1.out_channels == 64


def test_weight_decay_skips_norms_and_biases():
    from moderncnn.training.optim import param_groups
    model = moderncnn.create_model("resnet18_wrc", num_classes=3, in_chans=1)
    groups = param_groups(model, 0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name


def test_train_cli_has_every_flag():
    from moderncnn.cli import build_parser
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ["--model", "--dataset", "--data-dir", "--image-size", "--epochs", "--batch-size", "--lr",
                 "--optimizer", "--schedule", "--warmup", "--weight-decay", "--label-smoothing", "--ema",
                 "--grad-clip", "--subset", "--recipe", "--seed", "--device", "--amp", "--channels-last",
                 "--compile", "--out", "--name", "--resume", "--no-progress", "--tta", "--progressive-size",
                 "--progressive-fraction"]:
        assert flag in text, flag


def test_d2l_recipe_runs_with_xavier_and_no_augmentation(data_dir, tmp_path):
    result = moderncnn.train(**tiny(data_dir, tmp_path, model="densenet_d2l", recipe="d2l", epochs=1,
                                    image_size=32, lr=None, batch_size=None))
    cfg = result.config
    assert cfg.init == "xavier" and cfg.augment == "none" and cfg.batch_size == 256 and cfg.momentum == 0.0
    assert cfg.image_size == 32  # explicit flag beats the recipe's 96


def test_model_args_are_python_literals():
    from moderncnn.cli import parse_model_args
    assert parse_model_args(["small_input=True", "drop_rate=0.2", "block_config=(4, 8, 8)", "style=d2l"]) == {
        "small_input": True, "drop_rate": 0.2, "block_config": (4, 8, 8), "style": "d2l"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_model_args(["small_input"])


def test_predict_preprocesses_files_exactly_as_training(tmp_path):
    """Image folders are resized with PIL when read; predict must do the same, not a different resize."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / cls / f"{i}.png")
    moderncnn.train(dataset="imagefolder", data_dir=str(tmp_path / "imgs"), image_size=32, model="resnet18",
                    model_kwargs={"small_input": True}, epochs=1, batch_size=4, out=str(tmp_path), name="r",
                    progress=False)
    from moderncnn.data import Loader, load_dataset
    from moderncnn.predict import predict_files
    state = load_checkpoint(tmp_path / "r" / "last.pt")
    test = load_dataset("imagefolder", root=str(tmp_path / "imgs"), split="test", image_size=32)
    loader = Loader(test, 64, train=False, image_size=32, mean=state["normalization"]["mean"],
                    std=state["normalization"]["std"])
    model = moderncnn.load_model(tmp_path / "r")
    with torch.no_grad():
        probs = model(next(iter(loader))[0]).softmax(1)
    files = sorted(str(p) for p in (tmp_path / "imgs" / "test").rglob("*.png"))
    top = predict_files(str(tmp_path / "r"), files, top_k=2)
    for i, (_, ranked) in enumerate(top):
        by_name = dict(ranked)
        for c, name in enumerate(model.classes):
            assert by_name[name] == pytest.approx(probs[i, c].item(), abs=1e-5)
