"""Resume and signals: a run stopped by Ctrl-C, SIGTERM or the end of its epochs goes on exactly where it was."""
import csv
import re
import signal
import subprocess
import sys

import pytest
import torch

import moderncnn
from moderncnn.training import TrainingInterrupted, load_checkpoint

from helpers import CtrlCAtStep, tiny


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
