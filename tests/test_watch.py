"""Watching training: TensorBoard, live notebook curves, show_run, the LR range test, the worst-classified
images, and output that scripts can read."""
import functools
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import moderncnn
from moderncnn.cli import main

import helpers

TINY_MNIST = (256, 64)
tiny = functools.partial(helpers.tiny, epochs=1, seed=2)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    moderncnn.train(**tiny(data_dir, out, epochs=2))
    return out / "run"


# --- TensorBoard --------------------------------------------------------------------------------------------
def _events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_writes_the_runs_figures_and_a_resume_appends(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    moderncnn.train(**tiny(data_dir, tmp_path, tensorboard=True, val_split=64))
    run = tmp_path / "run"
    moderncnn.train(resume=str(run), epochs=2, progress=False)  # keeps the run's --tensorboard
    acc = _events(run)
    scalars = set(acc.Tags()["scalars"])
    for tag in ("loss/train", "loss/val", "loss/test", "accuracy/train", "accuracy/val", "accuracy/test", "lr",
                "throughput/images_per_s", "loss/train_step"):
        assert tag in scalars, tag
    assert [e.step for e in acc.Scalars("accuracy/test")] == [1, 2]  # no step written twice
    steps = [e.step for e in acc.Scalars("loss/train_step")]
    assert steps == sorted(set(steps)) and steps[0] == 0  # every 20th step, once
    assert {"confusion", "predictions"} <= set(acc.Tags()["images"])
    assert any("config" in tag for tag in acc.Tags()["tensors"])


def test_tensorboard_without_the_extra_is_one_line(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    assert main(["train", "--tensorboard", "--dataset", "mnist", "--data-dir", str(data_dir), "--out",
                 str(tmp_path), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'moderncnn[tensorboard]'" in err
    assert not any(tmp_path.iterdir())


# --- notebooks ------------------------------------------------------------------------------------------------
def test_importing_moderncnn_leaves_the_matplotlib_backend_alone(trained):
    code = textwrap.dedent(f"""
        import matplotlib
        matplotlib.use("svg")
        import moderncnn, moderncnn.report.run, moderncnn.compare, moderncnn.training.callbacks
        moderncnn.report.run.write_run_report({str(trained)!r})
        print(matplotlib.get_backend())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "svg"


def test_live_curves_draw_once_per_evaluation_in_place(data_dir, tmp_path, monkeypatch):
    pytest.importorskip("IPython")
    import IPython.display
    from moderncnn.training.notebook import LiveCurves
    calls = []

    class Handle:
        def update(self, obj):
            calls.append(("update", obj.data[:8]))

    def display(obj, display_id=False):
        calls.append(("display", display_id))
        return Handle()

    monkeypatch.setattr(IPython.display, "display", display)
    moderncnn.train(**tiny(data_dir, tmp_path, epochs=4, eval_every=2), callbacks=[LiveCurves()])
    assert calls[0] == ("display", True) and [c[0] for c in calls] == ["display", "update"]  # epochs 2 and 4
    assert calls[1][1] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_a_notebook_shows_a_live_bar_live_curves_and_the_report(data_dir, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    cells = [
        f"import moderncnn\nresult = moderncnn.train(dataset='mnist', data_dir={str(data_dir)!r}, epochs=3, "
        f"batch_size=64, subset=128, out={str(tmp_path)!r}, name='nb', seed=0)",
        "moderncnn.show_run(result.run_dir)",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    train_outputs = nb.cells[0].outputs
    images = [o for o in train_outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(images) == 1  # one figure, updated in place after each of the 3 evaluations
    widgets = [o for o in train_outputs if o.output_type == "display_data"
               and "application/vnd.jupyter.widget-view+json" in o.data]
    text = "".join(o.get("text", "") for o in train_outputs if o.output_type == "stream")
    assert widgets or "epoch" in text  # tqdm.auto: a widget where ipywidgets is installed
    assert text.count("epoch ") >= 3 and "done: final test accuracy" in text
    shown = nb.cells[1].outputs
    assert sum("image/png" in o.get("data", {}) for o in shown) >= 4  # curves, predictions, confusion, top losses
    assert any("Final test accuracy" in o.get("data", {}).get("text/markdown", "") for o in shown)


# --- top losses ----------------------------------------------------------------------------------------------
def test_every_report_shows_the_worst_classified_test_images(trained):
    import torch
    preds = torch.load(trained / "predictions.pt", weights_only=True)
    worst = preds["worst_index"]
    assert len(worst) == 16
    assert preds["true_prob"][worst].max() <= preds["true_prob"].sort().values[15] + 1e-7  # the 16 lowest p(true)
    with Image.open(trained / "top_losses.png") as img:
        assert img.size[0] > 400 and img.size[1] > 400
    assert "![top losses](top_losses.png)" in (trained / "report.md").read_text()


# --- the LR range test ---------------------------------------------------------------------------------------
def test_lr_find_sweeps_and_suggests(data_dir, tmp_path, capsys):
    assert main(["lr-find", "--dataset", "mnist", "--data-dir", str(data_dir), "--batch-size", "32",
                 "--steps", "30", "--out", str(tmp_path), "--name", "lr"]) == 0
    out = capsys.readouterr().out
    assert "suggested learning rate:" in out
    rows = (tmp_path / "lr" / "lr_find.csv").read_text().splitlines()
    assert rows[0] == "lr,loss,smoothed_loss" and 10 < len(rows) <= 31
    lrs = [float(r.split(",")[0]) for r in rows[1:]]
    assert lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-6)
    assert (tmp_path / "lr" / "lr_find.png").stat().st_size > 0
    result = moderncnn.lr_find(dataset="mnist", data_dir=str(data_dir), batch_size=32, steps=20, out=str(tmp_path),
                               name="lr2")
    assert 0 < result.suggestion < result.min_loss_lr and np.isfinite(result.steepest)


@pytest.mark.parametrize("flag", [["--budget", "10m"], ["--resume", "runs/x"]])
def test_lr_find_refuses_budget_and_resume(flag, capsys):
    assert main(["lr-find", *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"it takes no {flag[0]}" in err


# --- output for scripts ----------------------------------------------------------------------------------------
def _images(root, n=3):
    from moderncnn.data import load_dataset
    test = load_dataset("mnist", root=str(root[1]), split="test")
    root[0].mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = root[0] / ("nested" if i else ".") / f"img{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[i, 0].numpy()).save(path)
        paths.append(path)
    return paths


def test_predict_takes_files_directories_and_globs_and_prints_json(trained, data_dir, tmp_path, capsys):
    paths = _images((tmp_path / "imgs", data_dir))
    assert main(["predict", str(trained), str(tmp_path / "imgs"), "--json", "--top-k", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert sorted(d["path"] for d in lines) == sorted(str(p) for p in paths)  # the directory, recursively
    assert all(len(d["top_k"]) == 2 and {"label", "prob"} <= set(d["top_k"][0]) for d in lines)
    assert main(["predict", str(trained), str(tmp_path / "imgs" / "nested" / "*.png"), "--json"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_predict_names_each_failure_and_still_predicts_the_rest(trained, data_dir, tmp_path, capsys):
    good = _images((tmp_path / "imgs", data_dir), n=1)[0]
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    code = main(["predict", str(trained), str(good), str(tmp_path / "missing.png"), str(tmp_path / "notes.png"),
                 str(tmp_path / "empty")])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.startswith(str(good)) and len(captured.out.strip().splitlines()) == 1
    for name in ("missing.png", "notes.png", "empty"):
        assert name in captured.err
    assert "no image files in this directory" in captured.err


def test_eval_and_models_print_json(trained, capsys):
    assert main(["eval", str(trained), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "densenet_bc_fmnist" and 0 <= result["accuracy"] <= 1 and result["images"] == 64
    assert main(["models", "resnet1*", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in models] == ["resnet101", "resnet152", "resnet18", "resnet18_wrc"]
    assert models[2]["pretrained"] is True and models[2]["min_input"] == [3, 32, 32]


def test_quiet_training_prints_only_the_final_line(data_dir, tmp_path, capsys):
    assert main(["train", "--quiet", "--dataset", "mnist", "--data-dir", str(data_dir), "--epochs", "1",
                 "--batch-size", "64", "--out", str(tmp_path), "--name", "q"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("done: final test accuracy")


def test_curves_keep_the_tta_scored_epoch_out_of_the_plain_test_line():
    from matplotlib.figure import Figure
    from moderncnn.report.plots import draw_curves
    from moderncnn.runs import EpochRecord
    history = [EpochRecord(e, train_loss=2.0 / e, train_acc=0.2 * e, lr=0.1, seconds=1.0, images_per_second=1.0,
                           test_loss=1.5 / e, test_acc=0.2 * e) for e in (1, 2)]
    history.append(EpochRecord(3, train_loss=0.5, train_acc=0.7, lr=0.0, seconds=1.0, images_per_second=1.0, tta=2,
                               test_loss=0.4, test_acc=0.72))
    ax_loss, ax_acc = draw_curves(Figure(), history).axes
    lines = {line.get_label(): list(line.get_xdata()) for line in ax_acc.get_lines()}
    assert lines["test acc"] == [1, 2] and lines["test acc with TTA (level 2)"] == [3]
    # scored only at the end, with TTA (the speed run): no empty plain test entry in either legend
    only_last = [EpochRecord(e, train_loss=1.0, train_acc=0.5, lr=0.1, seconds=1.0, images_per_second=1.0)
                 for e in (1, 2)] + history[-1:]
    for ax in draw_curves(Figure(), only_last).axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert not {"test loss", "test acc"} & set(labels) and any("with TTA" in t for t in labels)
