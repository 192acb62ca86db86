"""Time budgets: the epoch planner's arithmetic, and runs whose schedule is planned to end with the budget."""
import json
import os
import subprocess
import sys

import pytest
import torch

from moderncnn.training import TrainConfig, load_checkpoint, train
from moderncnn.training.budget import TTA_VIEWS, EpochPlanner, parse_budget
from moderncnn.cli import build_parser, config_from_args
from moderncnn.runs import EpochRecord
from moderncnn.training import resolve_config
from moderncnn.training.config import BUDGET_MAX_EPOCHS

from helpers import make_mnist
from test_distributed import _free_port


def _planner(budget, **kwargs):
    kwargs.setdefault("max_epochs", 1000)
    kwargs.setdefault("full_side", 32)
    kwargs.setdefault("train_images", 1000)
    kwargs.setdefault("test_images", 500)
    planner = EpochPlanner(budget, **kwargs)
    planner.record_train(32, 9.0, 1000)  # 9 s per training epoch at 32x32
    planner.record_eval(1.0)  # 1 s per evaluation
    return planner


def test_plan_fills_the_budget_with_whole_epochs():
    assert _planner(100).plan(1, 10.0) == 10  # 10 epochs of 10 s end exactly at 100 s
    assert _planner(99.9).plan(1, 10.0) == 9
    assert _planner(100, max_epochs=7).plan(1, 10.0) == 7
    # The final evaluation under TTA level 2 costs 5 more evaluations: one epoch less fits.
    assert _planner(100, final_views=6).plan(1, 10.0) == 9
    # Already over the budget: the committed epochs are the plan.
    assert _planner(100).plan(3, 150.0) == 3


def test_plan_counts_steps_so_the_last_epoch_may_be_partial():
    planner = _planner(95, steps_per_epoch=10)
    # 9 whole epochs end at 90 s; four tenths of a 10th epoch (3.6 s) and its evaluation end at 94.6 s.
    assert planner.plan(1, 10.0) == 94
    assert planner.epochs(94) == 10 and planner.epochs(90) == 9
    assert planner.predicted_seconds(94, 10, 10.0) == pytest.approx(94.6)
    assert _planner(100, steps_per_epoch=10).plan(1, 10.0) == 100  # whole epochs where they fit exactly
    assert _planner(100, steps_per_epoch=10).plan(3, 150.0) == 30  # over the budget: the committed epochs
    # In the second half a plan within a quarter epoch of the budget is kept, in steps.
    assert planner.plan(6, 60.0, current=94) == 94


def test_a_plan_made_mid_epoch_may_end_before_an_epoch_longer_than_the_budget():
    # 100 steps of 3 s per epoch, 1 s evaluations, a 60 s budget: 5 steps done in 15 s leave 45 s, the
    # final evaluation takes 1, so 14 more steps fit (19 in all, 58 s); a plan from whole epochs is 100.
    planner = EpochPlanner(60, max_epochs=8, full_side=32, train_images=1000, test_images=500,
                           steps_per_epoch=100)
    planner.record_train(32, 300.0, 1000)
    planner.record_eval(1.0)
    assert planner.plan_mid_epoch(5, 15.0, current=800) == 19
    assert planner.predicted_seconds(19, 5, 15.0) == pytest.approx(58.0)
    assert planner.plan(1, 301.0) == 100
    # Over the budget already: twice the steps done, so the schedule still decays over some steps.
    assert planner.plan_mid_epoch(5, 58.0, current=800) == 10
    # ... but never past the epoch under way, and never fewer than the steps done.
    assert planner.plan_mid_epoch(90, 58.0, current=800) == 100
    assert planner.plan_mid_epoch(150, 58.0, current=800) == 200
    # Whole epochs are priced as before: the epoch under way counts its remaining steps and evaluation.
    assert planner.predicted_seconds(200, 150, 0.0) == pytest.approx(50 * 3 + 1)


def test_plan_prices_only_the_evaluations_eval_every_runs():
    # 9 s epochs, 1 s evaluations, the first epoch spent 10 s. Scoring every 3rd epoch and the last, 10
    # epochs end at 95 s (evaluations after epochs 3, 6, 9 and 10), 11 at 104 s: 10 fit in 100 s.
    assert _planner(100, eval_every=3).plan(1, 10.0) == 10
    assert _planner(100, eval_every=3).predicted_seconds(10, 1, 10.0) == pytest.approx(10 + 9 * 9 + 4)
    assert _planner(100, eval_every=3).predicted_seconds(11, 1, 10.0) == pytest.approx(10 + 10 * 9 + 4)
    assert _planner(100, eval_every=0).predicted_seconds(10, 1, 10.0) == pytest.approx(10 + 9 * 9 + 1)
    assert _planner(109, eval_every=0).plan(1, 10.0) == 11  # 10 + 10 * 9 + 1 = 101 s; 12 would be 110 s
    # A history row without test figures (an epoch --eval-every skipped) prices no evaluation.
    planner = _planner(100)
    planner.record_history([EpochRecord(1, train_loss=1.0, train_acc=0.5, lr=0.1, seconds=9.0, train_images=1000,
                                        images_per_second=1000 / 9.0, train_size=32, tta=0, test_acc=None)])
    assert planner.eval_seconds == 1.0


def test_tta_view_counts_match_the_views_evaluated():
    from moderncnn.training.loop import tta_views
    for level, views in TTA_VIEWS.items():
        assert len(tta_views(torch.zeros(1, 1, 4, 4), level)) == views


def test_plan_prices_small_progressive_epochs_by_area():
    planner = _planner(100, progressive_size=16, progressive_fraction=0.5)
    assert planner.epoch_train_seconds(16) == pytest.approx(9.0 / 4)
    assert planner.epoch_train_seconds(24) == pytest.approx(9.0 * (24 / 32) ** 2)
    planned = planner.plan(1, 10.0)
    assert planned > 10  # the early epochs at 16-28 pixels are cheaper
    assert planner.predicted_seconds(planned, 1, 10.0) <= 100 < planner.predicted_seconds(planned + 1, 1, 10.0)
    # A measurement at 16x16 replaces the area estimate there.
    planner.record_train(16, 4.0, 1000)
    assert planner.epoch_train_seconds(16) == pytest.approx(4.0)
    assert planner.epoch_train_seconds(20) == pytest.approx(4.0 * (20 / 16) ** 2)


def test_replanning_follows_the_times_then_only_shrinks():
    planner = _planner(100)  # epochs priced at the median of the last three measured at their side
    assert planner.plan(2, 20.0, current=10) == 10
    # First half of the plan: it follows the times either way.
    planner.record_train(32, 9.6, 1000)  # median of 9.0 and 9.6: 9.3
    assert planner.plan(2, 20.3, current=10) == 9
    planner.record_train(32, 8.0, 1000)
    planner.record_train(32, 8.0, 1000)  # 9.6, 8, 8: 8
    assert planner.plan(2, 19.0, current=10) == 11
    # Second half: jitter within a quarter of an epoch keeps the plan (10 epochs of 10.3 s end at 101.2 s) ...
    for _ in range(3):
        planner.record_train(32, 9.3, 1000)
    assert planner.plan(6, 60.0, current=10) == 10
    # ... one slow epoch among steady ones is priced at the median, not at itself ...
    planner.record_train(32, 12.0, 1000)
    assert planner.train_rate[32] * 1000 == pytest.approx(9.3)
    assert planner.plan(6, 60.0, current=10) == 10
    # ... a faster machine does not lengthen a decaying schedule ...
    planner.record_train(32, 6.0, 1000)
    planner.record_train(32, 6.0, 1000)
    assert planner.plan(6, 60.0, current=10) == 10
    # ... and a lasting slowdown shortens it: 60 s + 3 x 13 s fits, a fourth epoch would not.
    planner.record_train(32, 12.0, 1000)
    planner.record_train(32, 12.0, 1000)
    assert planner.plan(6, 60.0, current=10) == 9
    unmeasured = EpochPlanner(100, max_epochs=50, full_side=32)
    assert unmeasured.plan(1, 0.0) == 50 and unmeasured.plan(1, 0.0, current=7) == 7


def test_a_provisional_price_gives_way_to_measured_epochs():
    planner = EpochPlanner(100, max_epochs=50, full_side=32, train_images=1000)
    planner.record_train(32, 20.0, 1000, provisional=True)  # a few steps of the first epoch
    assert planner.measured and planner.epoch_train_seconds(32) == pytest.approx(20.0)
    planner.record_train(32, 9.0, 1000)  # the epoch itself: not averaged with the provisional price
    assert planner.epoch_train_seconds(32) == pytest.approx(9.0)
    planner.record_train(32, 30.0, 1000, provisional=True)  # ignored once the side is measured
    assert planner.epoch_train_seconds(32) == pytest.approx(9.0)


def test_a_cold_first_evaluation_does_not_shorten_the_plan():
    """Replays an H100 Fashion-MNIST run (140 s budget, TTA level 2): its first evaluation took 3.5 s
    (kernel search), the later ones 0.5 s; epochs took 15 s. Priced at 3.5 s per evaluation (and five more
    for the TTA views) the plan after epoch 2 was 6 epochs, 103 s of the 140."""
    def planner():
        return EpochPlanner(140, max_epochs=100, full_side=28, train_images=60000, test_images=10000,
                            final_views=6)
    cold_as_warm = planner()
    cold_as_warm.record_train(28, 15.0, 60000)
    cold_as_warm.record_eval(3.5)
    assert cold_as_warm.plan(2, 27.5 + 15.0 + 3.5, current=5) == 6
    fixed = planner()
    fixed.record_train(28, 15.0, 60000)
    fixed.record_eval(3.5, warm=False)
    estimate = 15.0 / 3 * 10000 / 60000  # a forward pass priced at a third of a training step
    assert fixed.evaluation_seconds() == pytest.approx(estimate)
    spent = 27.5 + 15.0 + estimate
    assert fixed.plan(2, spent, current=5) == 7
    fixed.record_eval(0.5)  # a warm evaluation replaces the estimate ...
    assert fixed.evaluation_seconds() == pytest.approx(0.5)
    fixed.record_eval(9.0, warm=False)  # ... and is not replaced by a cold one
    assert fixed.evaluation_seconds() == pytest.approx(0.5)
    assert fixed.plan(3, spent + 15.0 + 0.5, current=7) == 8  # 8 epochs end at ~136 s
    # A cold evaluation faster than the estimate is believed.
    quick = planner()
    quick.record_train(28, 15.0, 60000)
    quick.record_eval(0.3, warm=False)
    assert quick.evaluation_seconds() == pytest.approx(0.3)


def test_a_resumed_run_plans_from_its_history():
    planner = EpochPlanner(100, max_epochs=1000, full_side=32, train_images=1000, test_images=500)
    common = dict(train_loss=1.0, train_acc=0.5, lr=0.1)
    planner.record_history([
        EpochRecord(1, seconds=10.0, images_per_second=1000 / 9.0, train_images=1000, train_size=32, tta=0,
                    test_acc=0.5, **common),
        EpochRecord(2, seconds=12.0, images_per_second=1000 / 6.0, train_images=1000, train_size=32, tta=2,
                    test_acc=0.6, **common),
        EpochRecord(3, seconds=5.0, images_per_second=100.0, **common),  # before train_images existed: skipped
    ])
    assert planner.epoch_train_seconds(32) == pytest.approx(7.5)  # the median of the epochs' 9 s and 6 s
    assert planner.evaluation_seconds() == pytest.approx(1.0)  # not the TTA epoch's 6 s
    assert planner.plan(3, 22.0) == 12  # 22 s + 9 x 8.5 s = 98.5 s


def test_parse_budget_and_the_cli_flag():
    assert parse_budget("90s") == 90 and parse_budget("10m") == 600 and parse_budget("1.5h") == 5400
    assert parse_budget(" 45 ") == 45 and parse_budget(None) is None and parse_budget(12) == 12.0
    for bad in ("ten minutes", "0", "-5m"):
        with pytest.raises(ValueError, match="budget must"):
            parse_budget(bad)
    parser = build_parser()
    config, explicit = config_from_args(parser.parse_args(["train", "--budget", "10m"]))
    assert config["budget"] == 600.0 and "budget" in explicit
    config, explicit = config_from_args(parser.parse_args(["train", "--budget", "1h", "--eval-every", "4"]))
    assert config["eval_every"] == 4 and "eval_every" in explicit
    assert resolve_config(TrainConfig()).eval_every == 1  # every epoch unless asked
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--budget", "soon"])


def test_a_budget_replaces_the_recipes_epochs_unless_epochs_are_given():
    assert resolve_config(TrainConfig(recipe="fast", budget=60)).epochs == BUDGET_MAX_EPOCHS
    assert resolve_config(TrainConfig(recipe="fast", budget=60, epochs=3), {"epochs"}).epochs == 3
    assert resolve_config(TrainConfig(recipe="fast")).epochs == 4
    with pytest.raises(ValueError, match=r"budget must be in \(0, inf\), got -1"):
        resolve_config(TrainConfig(budget=-1))


TINY_MNIST = (128, 64)


def test_a_spent_budget_ends_the_schedule_in_the_epoch_it_plans(data_dir, tmp_path, capsys):
    # 1 ms fits no more than the first epoch: the plan made after its first steps is one epoch, so the
    # one-cycle schedule runs to its end (1/1000 of the peak) inside it, instead of stopping at its peak.
    result = train(dataset="mnist", data_dir=str(data_dir), model="densenet_bc_fmnist", epochs=3, budget=0.001,
                   batch_size=32, lr=0.1, out=str(tmp_path), name="b", progress=False)
    out = capsys.readouterr().out
    assert len(result.history) == 1
    assert result.history[0].lr == pytest.approx(0.1 * 1e-3)
    assert "epoch   1/1" in out and "time budget of 0s" in out
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["epochs_done"] == 1 and summary["epochs_planned"] == 1
    assert "time budget 0s" in (tmp_path / "b" / "report.md").read_text()
    # Each epoch's training images are recorded, so a resumed budgeted run can plan from its history.
    assert load_checkpoint(tmp_path / "b" / "last.pt")["history"][0]["train_images"] == 128


def test_an_epoch_longer_than_the_budget_is_cut_by_the_plan(tmp_path, capsys):
    # 640 images at batch 16 are 40 steps; 1 ms is spent by the third step, whose plan is twice the steps
    # done (6): the run ends mid-epoch with its schedule decayed, instead of training the whole epoch.
    data = make_mnist(tmp_path / "data", n_train=640, n_test=64, learnable=True)
    result = train(dataset="mnist", data_dir=str(data), model="densenet_bc_fmnist", epochs=3, budget=0.001,
                   batch_size=16, lr=0.1, out=str(tmp_path), name="cut", progress=False)
    assert [r.train_images for r in result.history] == [6 * 16]
    assert result.history[0].lr == pytest.approx(0.1 * 1e-3)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["scheduler"]["last_epoch"] == 6
    assert "(15% of the training set)" in capsys.readouterr().out
    assert "0.15 epochs (the last on 96 of 640 training images)" in (tmp_path / "cut" / "report.md").read_text()


def test_a_partial_last_epoch_ends_the_schedule_and_is_reported(data_dir, tmp_path, capsys, monkeypatch):
    # The plan is whatever the planner says (times vary): one and a half epochs of 4 steps.
    monkeypatch.setattr(EpochPlanner, "plan", lambda self, committed, spent, current=None: 6)
    monkeypatch.setattr(EpochPlanner, "plan_mid_epoch", lambda self, done, spent, current=None: 6)
    result = train(dataset="mnist", data_dir=str(data_dir), model="densenet_bc_fmnist", epochs=3, budget=60,
                   batch_size=32, lr=0.1, out=str(tmp_path), name="p", progress=False)
    out = capsys.readouterr().out
    assert [r.train_images for r in result.history] == [128, 64]
    assert result.history[-1].lr == pytest.approx(0.1 * 1e-3)  # the schedule ended with the plan
    assert "epoch   2/2" in out and "(50% of the training set)" in out and "used by 1.50 epochs" in out
    assert json.loads((tmp_path / "p" / "summary.json").read_text())["epochs_done"] == 2
    assert load_checkpoint(tmp_path / "p" / "last.pt")["scheduler"]["last_epoch"] == 6
    rows = (tmp_path / "p" / "metrics.csv").read_text().splitlines()
    assert rows[0].endswith(",train_images,skipped_steps,format_version") and rows[1].endswith(",128,0,3")
    assert rows[2].endswith(",64,0,3")
    assert "1.50 epochs (the last on 64 of 128 training images)" in (tmp_path / "p" / "report.md").read_text()
    from moderncnn.report.run import _epochs_words
    # Whole epochs that drop a last short batch (59,904 of 60,000 images) are whole epochs.
    whole = EpochRecord(1, train_loss=1.0, train_acc=0.5, lr=0.1, seconds=1.0, images_per_second=1.0,
                        train_images=59904)
    assert _epochs_words([whole] * 4) == "4 epochs"
    assert _epochs_words([whole]) == "1 epoch"
    assert _epochs_words([whole], train_images=60000, batch_size=128) == "1 epoch"  # less than a batch short


def test_eval_every_scores_the_test_set_every_nth_epoch_and_the_last(data_dir, tmp_path, capsys):
    from moderncnn.runs import read_metrics
    result = train(dataset="mnist", data_dir=str(data_dir), model="densenet_bc_fmnist", epochs=5, eval_every=2,
                   batch_size=32, lr=0.1, out=str(tmp_path), name="e", progress=False)
    out = capsys.readouterr().out
    assert [r.test_acc is not None for r in result.history] == [False, True, False, True, True]
    assert result.final_acc == result.history[-1].test_acc
    assert result.val_acc is None and result.chosen_epoch is None  # no validation set: nothing is chosen
    assert out.count("(test set not scored)") == 2
    rows = read_metrics(tmp_path / "e" / "metrics.csv")  # the skipped epochs' test cells are empty
    assert [r.scored for r in rows] == [False, True, False, True, True]
    assert all(r.train_acc is not None for r in rows)
    report = (tmp_path / "e" / "report.md").read_text()
    assert "scored every 2 epochs and after the last (`--eval-every 2`)" in report
    assert "| 1 | " in report and " | - | - | - | " in report
    assert (tmp_path / "e" / "curves.png").stat().st_size > 0
    assert not (tmp_path / "e" / "best.pt").exists()
    only_last = train(dataset="mnist", data_dir=str(data_dir), model="densenet_bc_fmnist", epochs=2, eval_every=0,
                      batch_size=32, lr=0.1, out=str(tmp_path), name="z", progress=False)
    assert [r.test_acc is not None for r in only_last.history] == [False, True]
    assert "after the last epoch only (`--eval-every 0`)" in (tmp_path / "z" / "report.md").read_text()
    with pytest.raises(ValueError, match="eval_every must be >= 0"):
        train(dataset="mnist", data_dir=str(data_dir), epochs=1, eval_every=-1, out=str(tmp_path), name="n")


def test_a_large_budget_runs_the_given_epochs(data_dir, tmp_path):
    result = train(dataset="mnist", data_dir=str(data_dir), model="densenet_bc_fmnist", epochs=2, budget=3600,
                   batch_size=32, out=str(tmp_path), name="big", progress=False)
    assert [r.epoch for r in result.history] == [1, 2]
    assert result.history[-1].lr == pytest.approx(result.config.lr * 1e-3)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_processes_follow_one_plan(data_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                          "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "moderncnn", "train",
                          "--dataset", "mnist", "--data-dir", str(data_dir), "--epochs", "3", "--budget", "0.001",
                          "--batch-size", "32", "--out", str(tmp_path), "--name", "ddp", "--no-progress"],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "epoch   1/1" in run.stdout and run.stdout.count("done: final test accuracy") == 1
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["epochs_done"] == 1
