"""The run directory format (typed files, format_version, migration), the validation split that chooses
best.pt, replaying a run's config, callbacks, and the one-line errors of bad input."""
import csv
import dataclasses
import functools
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import moderncnn
from moderncnn.checkpoint import load_checkpoint, save_checkpoint
from moderncnn.cli import build_parser, main
from moderncnn.data import DatasetError, ImageDataset
from moderncnn.runs import (FORMAT_VERSION, METRIC_FIELDS, RunFormatError, TrainConfig, load_run,
                            resolve_checkpoint)
from moderncnn.training import Callback, NonFiniteLossError, resolve_config

import helpers

TINY_MNIST = (320, 96)
tiny = functools.partial(helpers.tiny, epochs=3, seed=1)


@pytest.fixture(scope="module")
def validated_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("validated")
    result = moderncnn.train(**tiny(data_dir, out, val_split=0.2))
    return result, out / "run"


# --- the validation split --------------------------------------------------------------------------------
def _dataset(labels):
    labels = torch.tensor(labels)
    return ImageDataset(torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8), labels, ["a", "b", "c"], "t")


def test_validation_split_is_stratified_seeded_and_disjoint():
    data = _dataset([0] * 50 + [1] * 30 + [2] * 20)
    train, val = data.split_validation(0.1, seed=3)
    assert torch.bincount(val.labels).tolist() == [5, 3, 2]  # each class its share
    assert len(train) == 90 and val.split == "val"
    again, _ = data.split_validation(0.1, seed=3)
    assert torch.equal(again.labels, train.labels)
    counted_train, counted = data.split_validation(10, seed=3)  # a count, not a fraction
    assert len(counted) == 10 and len(counted_train) == 90
    other, _ = data.split_validation(0.1, seed=4)
    ids = torch.arange(100)
    marked = ImageDataset(ids.view(100, 1, 1, 1).to(torch.uint8), data.labels, data.classes, "t")
    kept, held = marked.split_validation(0.1, seed=3)
    assert not set(kept.images.flatten().tolist()) & set(held.images.flatten().tolist())


@pytest.mark.parametrize("size,message", [
    (0, "val_split must be positive"),
    (-3, "val_split must be positive"),
    (100, "holds out 100 of the 100"),
    (0.98, "leaves no training image in class 'c' (20 images)"),
])
def test_validation_split_refuses_what_leaves_nothing(size, message):
    data = _dataset([0] * 50 + [1] * 30 + [2] * 20)
    with pytest.raises(DatasetError, match=re.escape(message)):
        data.split_validation(size)
    with pytest.raises(DatasetError, match=r"leaves no training image in class 'a' \(1 image\)"):
        _dataset([0] + [1] * 10 + [2] * 10).split_validation(0.95)


def test_validation_chooses_best_pt_and_the_test_set_chooses_nothing(validated_run):
    result, run = validated_run
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert list(rows[0]) == METRIC_FIELDS and all(r["val_acc"] for r in rows)
    val = [float(r["val_acc"]) for r in rows]
    chosen = val.index(max(val)) + 1
    assert result.chosen_epoch == chosen and result.val_acc == pytest.approx(max(val), abs=1e-5)
    best = load_checkpoint(run / "best.pt")
    assert best["epoch"] == chosen and "optimizer" not in best
    summary = json.loads((run / "summary.json").read_text())
    assert summary["weights"] == "best.pt" and summary["chosen_epoch"] == chosen
    assert summary["final_acc"] == pytest.approx(float(rows[-1]["test_acc"]), abs=1e-5)
    info = json.loads((run / "config.json").read_text())
    assert info["val_images"] == 64 and info["train_images"] == 256 and info["format_version"] == FORMAT_VERSION
    report = (run / "report.md").read_text()
    assert f"**Final test accuracy {result.final_acc:.4f}**; best.pt is epoch {chosen}" in report
    assert "64 images held out of the training set" in report
    assert resolve_checkpoint(run) == run / "best.pt"


def test_without_validation_the_final_weights_are_the_model(data_dir, tmp_path):
    result = moderncnn.train(**tiny(data_dir, tmp_path, epochs=2, ema=0.5))
    run = tmp_path / "run"
    assert not (run / "best.pt").exists() and resolve_checkpoint(run) == run / "last.pt"
    model = moderncnn.load_model(run)  # the EMA weights the run evaluated, not the raw ones
    ema = load_checkpoint(run / "last.pt")["ema"]
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, ema[f"module.{key}"])
    assert "No best.pt" in (run / "report.md").read_text()
    assert json.loads((run / "summary.json").read_text())["weights"] == "last.pt"
    assert result.val_acc is None


def test_an_image_folders_val_folder_is_the_validation_set(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        for cls in ("a", "b"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / cls / f"{i}.png")
    result = moderncnn.train(dataset="imagefolder", data_dir=str(tmp_path / "imgs"), model="resnet18",
                             model_kwargs={"small_input": True}, epochs=1, batch_size=4, out=str(tmp_path),
                             name="r", progress=False)
    info = json.loads((tmp_path / "r" / "config.json").read_text())
    assert (info["train_images"], info["val_images"], info["test_images"]) == (12, 6, 6)
    assert result.chosen_epoch == 1 and (tmp_path / "r" / "best.pt").is_file()
    assert "the val/ folder (6 images)" in (tmp_path / "r" / "report.md").read_text()


# --- format versions --------------------------------------------------------------------------------------
def test_a_run_written_before_format_version_2_migrates(validated_run, tmp_path):
    _, run = validated_run
    old = tmp_path / "old"
    old.mkdir()
    for name in ("last.pt", "best.pt", "predictions.pt"):
        (old / name).write_bytes((run / name).read_bytes())
    info = json.loads((run / "config.json").read_text())
    info.pop("format_version")
    info["config"].pop("val_split")
    info["config"].pop("tta_below")  # older than selective TTA: every test image got the views
    (old / "config.json").write_text(json.dumps(info))
    fields = ["epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "images_per_second",
              "tta", "train_size", "train_images"]  # version 1's columns
    with open(run / "metrics.csv") as src, open(old / "metrics.csv", "w", newline="") as dst:
        writer = csv.DictWriter(dst, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(csv.DictReader(src))
    summary = json.loads((run / "summary.json").read_text())
    summary = {k: v for k, v in summary.items() if k not in ("format_version", "weights", "chosen_epoch")}
    (old / "summary.json").write_text(json.dumps({**summary, "best_acc": 0.9}))
    loaded = load_run(old)
    assert loaded.info.format_version == 1 and loaded.history[0].val_acc is None
    assert loaded.config.val_split is None and loaded.summary.final_acc == summary["final_acc"]
    assert loaded.config.tta_below == 1.0
    # version 1's best.pt was chosen on the test set: the final weights are used instead
    assert loaded.weights_path == old / "last.pt" and resolve_checkpoint(old) == old / "last.pt"
    assert moderncnn.load_model(old).classes == [str(i) for i in range(10)]


@pytest.mark.parametrize("name", ["config.json", "metrics.csv", "summary.json"])
def test_a_run_file_of_another_version_fails_naming_file_and_versions(validated_run, tmp_path, name):
    _, run = validated_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("config.json", "metrics.csv", "summary.json"):
        (copy / f).write_text((run / f).read_text())
    path = copy / name
    if name == "metrics.csv":
        path.write_text(re.sub(r",3(\r?\n)", r",7\1", path.read_text()))
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 7}))
    with pytest.raises(RunFormatError, match=rf"{name}: format_version 7, but moderncnn .* reads format_version 3"):
        load_run(copy)


def test_a_checkpoint_of_another_version_is_one_line(validated_run, tmp_path, capsys):
    _, run = validated_run
    state = load_checkpoint(run / "last.pt")
    save_checkpoint({**state, "format_version": 9}, tmp_path / "future.pt")
    assert main(["eval", str(tmp_path / "future.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "future.pt: format_version 9" in err


# --- replaying a config ----------------------------------------------------------------------------------
def _args(*argv):
    from moderncnn.cli import config_from_args
    values, explicit = config_from_args(build_parser().parse_args(["train", *argv]))
    return resolve_config(TrainConfig.from_dict(values), explicit).config


def test_a_runs_config_json_replays_it_and_flags_win(validated_run, tmp_path):
    result, run = validated_run
    replayed = _args("--config", str(run / "config.json"))
    ignored = ("resume", "name", "out", "progress")
    assert {k: v for k, v in dataclasses.asdict(replayed).items() if k not in ignored} == \
        {k: v for k, v in dataclasses.asdict(result.config).items() if k not in ignored}
    assert _args("--config", str(run / "config.json"), "--lr", "0.05").lr == 0.05
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"epochs": 7, "optimizer": "adamw", "model_kwargs": {"bn_size": 3}}))
    mine = _args("--config", str(recipe), "--epochs", "2", "--model-arg", "drop_rate=0.1")
    assert (mine.epochs, mine.optimizer, mine.model_kwargs) == (2, "adamw", {"bn_size": 3, "drop_rate": 0.1})


@pytest.mark.parametrize("content,message", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    ('{"epochz": 3}', "unknown field 'epochz'; did you mean 'epochs'"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, capsys, content, message):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


# --- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--lr", "nan"], "lr must be a finite number, got nan"),
    (["--lr", "inf"], "lr must be a finite number, got inf"),
    (["--lr", "-0.1"], r"lr must be in (0, inf), got -0.1"),
    (["--momentum", "1.5"], r"momentum must be in [0, 1), got 1.5"),
    (["--label-smoothing", "nan"], "label_smoothing must be a finite number"),
    (["--val-split", "0"], r"val_split must be in (0, inf), got 0"),
    (["--val-split", "-5"], r"val_split must be in (0, inf), got -5"),
    (["--val-split", "2.5"], "val_split must be a count of images or a fraction below 1"),
    (["--epochs", "0"], "epochs must be a positive whole number"),
])
def test_out_of_range_numbers_are_refused_before_training(tmp_path, capsys, argv, message):
    assert main(["train", *argv, "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_val_split_leaving_a_class_without_training_images_is_one_line(data_dir, tmp_path, capsys):
    assert main(["train", "--dataset", "mnist", "--data-dir", str(data_dir), "--val-split", "319",
                 "--out", str(tmp_path), "--no-progress"]) == 1  # found once the data is read: a run-time failure
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "leaves no training image in class" in err


class DivergeAtLastStep(Callback):
    """Fills the weights with NaN after the run's last step: only the evaluation can see it."""

    def on_step_end(self, run, state, step):
        if step.global_step == run.plan.total_steps - 1:
            with torch.no_grad():
                for p in run.model.parameters():
                    p.fill_(float("nan"))


def test_non_finite_weights_at_an_evaluation_stop_the_run(data_dir, tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"after epoch 2, the model's outputs on the test set are not finite"):
        moderncnn.train(**tiny(data_dir, tmp_path, epochs=2), callbacks=[DivergeAtLastStep()])
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    assert last["epoch"] == 1 and all(torch.isfinite(v).all() for v in last["model"].values()
                                      if v.is_floating_point())
    assert not (tmp_path / "run" / "summary.json").exists()


def _folder(root, classes):
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def test_eval_on_a_folder_with_other_classes_names_both_lists(tmp_path, capsys):
    moderncnn.train(dataset="imagefolder", data_dir=str(_folder(tmp_path / "ab", ["a", "b"])), model="resnet18",
                    model_kwargs={"small_input": True}, epochs=1, batch_size=4, out=str(tmp_path), name="r",
                    progress=False)
    other = _folder(tmp_path / "abc", ["a", "b", "c"])
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "r"), "--dataset", "imagefolder", "--data-dir", str(other)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "['a', 'b', 'c']" in err and "['a', 'b']" in err and "Traceback" not in err


def test_abbreviated_flags_are_errors_and_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--epoch", "3"])
    assert stop.value.code == 2 and "unrecognized arguments: --epoch 3" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lr must be a finite number"):
        main(["train", "--lr", "nan", "--debug"])


def test_every_train_flag_has_help_with_its_default_and_compare_takes_them_all():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    train_help = commands["train"].format_help()
    compare_flags = {opt for a in commands["compare"]._actions for opt in a.option_strings}
    for f in dataclasses.fields(TrainConfig):
        flag = {"model_kwargs": "--model-arg"}.get(f.name, "--" + f.name.replace("_", "-"))
        assert flag in train_help, flag
        if f.name not in ("model", "resume", "name", "out", "progress"):
            assert flag in compare_flags, flag
    for action in commands["train"]._actions:
        if action.option_strings and action.help and action.dest not in ("help",):
            assert "default" in action.help or action.dest in ("amp", "debug"), action.option_strings
    assert "(default: 0.2 in the fast recipe)" in " ".join(train_help.split())


@pytest.mark.slow
def test_compare_passes_every_train_option_on(data_dir, tmp_path):
    code = main(["compare", "--models", "densenet_bc_fmnist", "--dataset", "mnist", "--data-dir", str(data_dir),
                 "--epochs", "1", "--batch-size", "64", "--label-smoothing", "0.2", "--val-split", "32",
                 "--weight-decay", "0.001", "--out", str(tmp_path), "--name", "c", "--no-progress"])
    assert code == 0
    cfg = load_run(tmp_path / "c" / "densenet_bc_fmnist").config
    assert (cfg.label_smoothing, cfg.val_split, cfg.weight_decay, cfg.batch_size) == (0.2, 32, 0.001, 64)
    rows = list(csv.DictReader(open(tmp_path / "c" / "results.csv")))
    assert rows[0]["chosen_val_acc"] != ""


# --- callbacks ---------------------------------------------------------------------------------------------
class EpochRecorder(Callback):
    """The example of the docs: a callback that keeps what each event saw."""

    def __init__(self):
        self.events = []

    def on_train_start(self, run, state):
        self.events.append(("start", run.cfg.model, state.epoch))

    def on_step_end(self, run, state, step):
        if step.step == 0:
            self.events.append(("step", step.epoch, step.loss.detach().item()))

    def on_epoch_end(self, run, state, record):
        self.events.append(("epoch", record.epoch, record.test_acc, state.done))

    def on_train_end(self, run, state):
        self.events.append(("end", len(state.history)))


def test_a_users_callback_sees_every_event(data_dir, tmp_path):
    recorder = EpochRecorder()
    result = moderncnn.train(**tiny(data_dir, tmp_path, epochs=2), callbacks=[recorder])
    kinds = [e[0] for e in recorder.events]
    assert kinds == ["start", "step", "epoch", "step", "epoch", "end"]
    assert recorder.events[0] == ("start", "densenet_bc_fmnist", 0)
    assert recorder.events[4] == ("epoch", 2, result.final_acc, True)
    assert recorder.events[2][3] is False
