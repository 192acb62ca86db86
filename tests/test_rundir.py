"""Run directories under faults: one writer, checkpoints that agree after a crash, resume exact or refused, damaged
files named, every command-line error one line."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import moderncnn
from moderncnn.runlock import RunLockedError, lock_run_dir, remove_stale_temporaries
from moderncnn.runs import RunFileError, load_run
from moderncnn.training import TrainingInterrupted, load_checkpoint
from moderncnn.training import callbacks as train_callbacks

from helpers import make_mnist, tiny


TINY_MNIST = (192, 64)  # steps are counted below


def _cli(*args, env=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "moderncnn", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _train_args(data_dir, out, name="run", epochs=2, seed=3):
    return ["train", "--dataset", "mnist", "--data-dir", data_dir, "--epochs", epochs, "--batch-size", 64,
            "--lr", 0.2, "--augment", "none", "--seed", seed, "--out", out, "--name", name, "--no-progress"]


def _one_error_line(proc, command):
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"moderncnn {command}: error: "), proc.stderr
    return lines[0]


# --- one writer ----------------------------------------------------------------------------------------------

def test_a_locked_run_refuses_every_other_writer_and_no_reader(data_dir, tmp_path):
    moderncnn.train(**tiny(data_dir, tmp_path, epochs=1))
    run = tmp_path / "run"
    with lock_run_dir(run):  # this process plays the run still training
        for args in (_train_args(data_dir, tmp_path, epochs=2), ["train", "--resume", run, "--epochs", 2]):
            proc = _cli(*args)
            assert proc.returncode == 1
            line = _one_error_line(proc, "train")
            assert f"is being written by another moderncnn process (PID {os.getpid()})" in line
        with pytest.raises(RunLockedError):
            lock_run_dir(run)
        assert _cli("eval", run).returncode == 0  # readers take no lock
    assert [r.epoch for r in load_run(run).history] == [1]


def test_of_two_runs_started_together_exactly_one_trains(data_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "moderncnn", *map(str, _train_args(data_dir, tmp_path, seed=s))],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for s in (5, 6)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    winners = [i for i, (code, _, _) in enumerate(results) if code == 0]
    assert len(winners) == 1, results
    loser = results[1 - winners[0]]
    assert loser[0] != 0 and ("being written by another" in loser[2] or "already holds a run" in loser[2])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["seed"] == (5, 6)[winners[0]]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["config"]["seed"] == saved["seed"]


def test_a_killed_writer_leaves_no_lock_and_its_temporary_files_go(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from moderncnn.runlock import lock_run_dir; "
                               "lock_run_dir(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
                               str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
        lock_run_dir(tmp_path / "run")
    dead = tmp_path / "run" / f".last.pt.{holder.pid}.beef.tmp"
    dead.write_bytes(b"half a checkpoint")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    mine = tmp_path / "run" / f".metrics.csv.{os.getpid()}.cafe.tmp"
    mine.write_text("in progress")
    with lock_run_dir(tmp_path / "run"):
        assert not dead.exists() and mine.exists()
    assert remove_stale_temporaries(tmp_path / "run") == 0


# --- checkpoints that agree ------------------------------------------------------------------------------------

class _Crash(BaseException):
    """Stands for the process dying: nothing after it runs."""


def _agree(run):
    summary = json.loads((run / "summary.json").read_text())
    last, best = load_checkpoint(run / "last.pt"), load_checkpoint(run / "best.pt")
    assert summary["chosen_epoch"] == last["best_epoch"] == best["best_epoch"] == best["epoch"]
    assert f"epoch {best['epoch']}" in (run / "report.md").read_text()
    chosen, best_file = moderncnn.load_model(run), moderncnn.load_model(run / "best.pt")
    torch.testing.assert_close(chosen.state_dict(), best_file.state_dict())


def test_a_crash_between_best_and_last_is_repaired_by_resume(data_dir, tmp_path, monkeypatch):
    real = train_callbacks.save_checkpoint
    calls = []

    def dies_before_last_of_epoch_2(state, path):
        calls.append((path.name, state["epoch"]))
        if path.name == "last.pt" and state["epoch"] == 2 and state["best_epoch"] == 2:
            raise _Crash
        return real(state, path)

    monkeypatch.setattr(train_callbacks, "save_checkpoint", dies_before_last_of_epoch_2)
    with pytest.raises(_Crash):
        moderncnn.train(**tiny(data_dir, tmp_path, epochs=3, val_split=48, lr=0.05))
    monkeypatch.setattr(train_callbacks, "save_checkpoint", real)
    assert ("best.pt", 2) in calls  # best.pt was written first
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
    moderncnn.train(resume=str(tmp_path / "run"), progress=False)
    _agree(tmp_path / "run")


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(data_dir, tmp_path):
    rng = random.Random(0)
    for attempt in range(4):
        out = tmp_path / str(attempt)
        args = [*_train_args(data_dir, out, epochs=8), "--val-split", 48]
        proc = subprocess.Popen([sys.executable, "-m", "moderncnn", *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
        time.sleep(rng.uniform(3, 9))  # from the start-up to the last epochs
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        run = out / "run"
        if not ((run / "summary.json").exists() and (run / "report.md").exists()):  # resume (or restart) completes it
            done = _cli(*(["train", "--resume", run] if (run / "last.pt").exists() else args))
            assert done.returncode == 0, done.stderr
        _agree(run)
        assert [r.epoch for r in load_run(run).history] == list(range(1, 9))


def test_a_second_ctrl_c_during_the_save_says_where_last_pt_stands(data_dir, tmp_path, monkeypatch):
    real = train_callbacks.save_checkpoint

    def interrupted_while_saving(state, path):
        if state.get("step"):  # the save of the first Ctrl-C: a second one comes in the middle of it
            signal.raise_signal(signal.SIGINT)
        return real(state, path)

    monkeypatch.setattr(train_callbacks, "save_checkpoint", interrupted_while_saving)
    from helpers import CtrlCAtStep
    with pytest.raises(TrainingInterrupted) as stop:  # 3 steps an epoch: the 5th is in epoch 2
        moderncnn.train(**tiny(data_dir, tmp_path, epochs=2), callbacks=[CtrlCAtStep(5)])
    assert stop.value.exit_code == 130
    assert "still holds the end of epoch 1" in str(stop.value) and "resume with: moderncnn train --resume" in str(
        stop.value)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


# --- resume: exact, or refused --------------------------------------------------------------------------------

@pytest.fixture()
def one_epoch(data_dir, tmp_path):
    moderncnn.train(**tiny(data_dir, tmp_path, epochs=1, val_split=48))
    return tmp_path / "run"


def test_resume_refuses_changed_options_naming_each(one_epoch):
    proc = _cli("train", "--resume", one_epoch, "--epochs", 2, "--lr", 0.01, "--seed", 7, "--model", "resnet18")
    assert proc.returncode == 2
    line = _one_error_line(proc, "train")
    assert "lr: 0.2 -> 0.01" in line and "seed: 3 -> 7" in line and "model: densenet_bc_fmnist -> resnet18" in line
    assert "--pretrained" in line
    assert [r.epoch for r in load_run(one_epoch).history] == [1]  # nothing trained


def test_resume_paths_that_cannot_resume(one_epoch, tmp_path):
    proc = _cli("train", "--resume", one_epoch / "best.pt", "--epochs", 2)
    assert proc.returncode == 2 and "best.pt holds chosen weights without the optimizer state" in _one_error_line(
        proc, "train")
    proc = _cli("train", "--resume", tmp_path / "missing_dir")
    assert proc.returncode == 2 and f"--resume {tmp_path / 'missing_dir'}: no such run directory" in proc.stderr


def test_resume_on_changed_data_is_refused(tmp_path):
    data = make_mnist(tmp_path / "data", n_train=128, n_test=64, learnable=True)
    moderncnn.train(**tiny(data, tmp_path, epochs=1))
    make_mnist(tmp_path / "data", n_train=128, n_test=64, learnable=True, seed=9)  # same count, other images
    with pytest.raises(ValueError, match=r"the training data changed since the run started .*the same 128 images"):
        moderncnn.train(resume=str(tmp_path / "run"), epochs=2, progress=False)


def test_resume_on_a_folder_with_added_images_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / cls / f"{i}.png")
    options = dict(dataset="imagefolder", data_dir=str(tmp_path / "imgs"), model="nin",
                   model_kwargs={"small_input": True},
                   epochs=1, batch_size=4, out=str(tmp_path), name="run", progress=False, image_size=20,
                   cache_dir=str(tmp_path / "cache"))
    moderncnn.train(**options)
    added = tmp_path / "imgs" / "train" / "a" / "new.png"
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(added)
    with pytest.raises(ValueError, match=r"imgs/train: 8 -> 9 images"):
        moderncnn.train(resume=str(tmp_path / "run"), epochs=2, progress=False)


def test_a_run_killed_before_its_summary_is_completed_by_resume(one_epoch):
    (one_epoch / "summary.json").unlink()
    (one_epoch / "report.md").unlink()
    (one_epoch / "metrics.csv").write_text("epoch,train_loss\n1,0.")  # cut mid-write
    proc = _cli("train", "--resume", one_epoch)
    assert proc.returncode == 0, proc.stderr
    run = load_run(one_epoch)
    assert run.summary is not None and [r.epoch for r in run.history] == [1]
    assert (one_epoch / "report.md").is_file()
    assert "already finished 1 epochs" in _one_error_line(_cli("train", "--resume", one_epoch), "train")


def test_a_format_2_run_resumes_with_a_warning(one_epoch):
    state = load_checkpoint(one_epoch / "last.pt")
    state.update(format_version=2, data_fingerprint=None)
    state["config"]["amp"] = False  # format 2 spelled fp32 so
    state.pop("precision")
    from moderncnn.checkpoint import save_checkpoint
    save_checkpoint(state, one_epoch / "last.pt")
    with pytest.warns(UserWarning, match="whether its training data changed cannot be checked"):
        result = moderncnn.train(resume=str(one_epoch), epochs=2, progress=False)
    assert [r.epoch for r in result.history] == [1, 2] and result.config.amp == "off"


def test_report_command_rebuilds_the_report(one_epoch):
    (one_epoch / "report.md").unlink()
    (one_epoch / "confusion.png").unlink()
    proc = _cli("report", one_epoch)
    assert proc.returncode == 0, proc.stderr
    assert (one_epoch / "confusion.png").is_file() and "# densenet_bc_fmnist on mnist" in (
        one_epoch / "report.md").read_text()


# --- damaged run files ------------------------------------------------------------------------------------------

def _cut_row(path):
    header, row = path.read_text().splitlines()[:2]
    path.write_text(f"{header}\n{row[:len(row) // 2]}\n")


def _text_cell(path):
    header, row = path.read_text().splitlines()[:2]
    cells = row.split(",")
    cells[1] = "abc"  # train_loss
    path.write_text(f"{header}\n{','.join(cells)}\n")


def _text_number(path):
    data = json.loads(path.read_text())
    path.write_text(json.dumps(dict(data, final_acc="abc")))


DAMAGE = {
    "config.json": [("no config key", b'{"format_version": 3}', "no \"config\" object"),
                    ("binary", b"\xff\xfe\x00garbage", "not UTF-8 text"),
                    ("truncated", b'{"format_version": 3, "con', "not valid JSON")],
    "metrics.csv": [("cut row", _cut_row, "a row with too few fields|a row without"),
                    ("text cell", _text_cell, "train_loss is 'abc', not a number"),
                    ("binary", b"\x80\x81\x82", "not UTF-8 text")],
    "summary.json": [("empty object", b"{}", "missing model"),
                     ("text number", _text_number, "could not convert")],
}


def _damage(path, content):
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        content(path)


@pytest.mark.parametrize("name, kind, content, message",
                         [(n, k, c, m) for n, cases in DAMAGE.items() for k, c, m in cases])
def test_damaged_run_files_are_named(one_epoch, name, kind, content, message):
    _damage(one_epoch / name, content)
    with pytest.raises(RunFileError, match=rf"{name}: .*({message})"):
        load_run(one_epoch)


# The commands read a run through load_run, checked above for every kind of damage: one kind per file here.
@pytest.mark.parametrize("name, content", [(n, cases[0][1]) for n, cases in DAMAGE.items()], ids=list(DAMAGE))
def test_a_damaged_run_file_does_not_stop_eval_or_predict_and_report_names_it(one_epoch, tmp_path, name, content):
    _damage(one_epoch / name, content)
    assert _cli("eval", one_epoch).returncode == 0
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    assert _cli("predict", one_epoch, image).returncode == 0
    proc = _cli("report", one_epoch)
    assert proc.returncode == 1 and name in _one_error_line(proc, "report")


def test_resume_repairs_damaged_run_files(one_epoch):
    (one_epoch / "config.json").write_bytes(b"\xff")
    (one_epoch / "metrics.csv").write_text("nonsense")
    result = moderncnn.train(resume=str(one_epoch), epochs=2, progress=False)
    run = load_run(one_epoch)
    assert [r.epoch for r in run.history] == [1, 2] and run.summary.final_acc == result.final_acc


def test_a_damaged_compare_json_is_named(tmp_path):
    from moderncnn.compare import write_comparison_report
    (tmp_path / "compare.json").write_text('{"models": ["a"')
    with pytest.raises(RunFileError, match="compare.json: not valid JSON"):
        write_comparison_report(tmp_path)


# --- the command line's error contract ---------------------------------------------------------------------------

def test_usage_errors_exit_2_and_runtime_failures_exit_1(tmp_path):
    proc = _cli("train", "--model-arg", "bogus=1", "--data-dir", tmp_path / "nowhere", "--dataset", "mnist")
    assert proc.returncode == 2
    line = _one_error_line(proc, "train")
    assert "densenet_bc_fmnist does not take bogus" in line and "growth_rate" in line  # before any data loads
    assert _cli("train", "--model", "densnet121").returncode == 2
    proc = _cli("train", "--dataset", "mnist", "--data-dir", tmp_path / "nowhere", "--out", tmp_path)
    assert proc.returncode == 1 and "mnist" in _one_error_line(proc, "train")
    assert not (tmp_path / "nowhere").exists() and not list(tmp_path.glob("*mnist*"))  # a failed start leaves nothing
    assert _cli("eval", tmp_path / "nothing.pt").returncode == 1


def test_debug_shows_the_traceback(tmp_path):
    proc = _cli("eval", tmp_path / "nothing.pt", "--debug")
    assert "Traceback" in proc.stderr


def test_the_library_log_shows_on_the_console_only_under_the_command_line(capsys):
    import logging
    from moderncnn.cli import _console_logging
    log = logging.getLogger("moderncnn.compare")
    log.info("before")  # a program that configured no logging sees no notes
    with _console_logging():
        log.info("[1/2] a note")
        log.warning("slow")
    log.info("after")
    captured = capsys.readouterr()
    assert captured.out == "[1/2] a note\n" and captured.err == "moderncnn: warning: slow\n"
    assert all(isinstance(h, logging.NullHandler) for h in logging.getLogger("moderncnn").handlers)


def test_warnings_keep_their_origin():
    from moderncnn.cli import _warning_line
    from moderncnn.runs import ModerncnnWarning
    assert _warning_line("slow", ModerncnnWarning, "x.py", 1) == "moderncnn: warning: slow\n"
    torch_line = _warning_line("deprecated", FutureWarning, torch.__file__, 7)
    assert torch_line.startswith(torch.__file__) and "FutureWarning: deprecated" in torch_line


# --- a full disk ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0 or sys.platform != "linux", reason="mounting a tmpfs needs root on Linux")
def test_a_full_disk_during_the_cache_build_is_an_error(tmp_path):
    from moderncnn.data import DatasetError, read_image_folder
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(40):
            image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(image).save(tmp_path / "imgs" / cls / f"{i}.png")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("tmpfs could not be mounted here")
    try:
        with pytest.raises(DatasetError, match=r"no space left on .* \(needs 1 MB"):
            read_image_folder(tmp_path / "imgs", image_size=64, cache_root=disk, cache="disk")
        assert not list(disk.rglob(".building-*"))
    finally:
        subprocess.run(["umount", str(disk)])
