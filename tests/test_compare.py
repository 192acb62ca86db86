"""moderncnn compare on a tiny generated dataset: every file, every row, resume, budget."""
import csv
import json
import logging

import pytest

import moderncnn
from moderncnn.compare import compare, parse_budget
from moderncnn.report.summary import count_parameters, summary


TINY_MNIST = (128, 64)


def test_compare_two_models_writes_report_and_resumes(data_dir, tmp_path, caplog):
    models = ["densenet_bc_fmnist", "resnet18"]
    comp = compare(models, dataset="mnist", epochs=1, out=str(tmp_path), name="cmp", progress=False,
                   data_dir=str(data_dir), batch_size=32, image_size=32)
    for name in ("report.md", "results.csv", "accuracy.png", "tradeoff.png", "compare.json"):
        assert (comp / name).is_file(), name
    with open(comp / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["model"] for r in rows) == sorted(models)
    accs = [float(r["final_acc"]) for r in rows]
    assert accs == sorted(accs, reverse=True)  # sorted by accuracy
    for r in rows:  # the columns describe each run's own network, measured again here
        model = moderncnn.load_model(comp / r["model"])
        assert int(r["params"]) == count_parameters(model)
        assert int(r["flops_per_image"]) == summary(model, (1, 1, 32, 32)).total_flops
        assert 50 < float(r["peak_memory_mb"]) < 64 * 1024  # the process's peak RSS: a real size, in MB
        assert int(r["epochs_done"]) == 1
    report = (comp / "report.md").read_text()
    assert all(f"| {m} |" in report for m in models) and "FLOPs/image" in report
    stamp = (comp / "resnet18" / "summary.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="moderncnn"):
        compare(models, dataset="mnist", epochs=1, out=str(tmp_path), name="cmp", progress=False,
                data_dir=str(data_dir), batch_size=32, image_size=32)
    notes = [r.getMessage() for r in caplog.records if r.name == "moderncnn.compare"]
    assert sum("finished earlier, skipped" in n for n in notes) == 2 and notes[-1].startswith("comparison report: ")
    assert (comp / "resnet18" / "summary.json").stat().st_mtime_ns == stamp


def test_budget_stops_after_the_epoch_that_passes_it(data_dir, tmp_path):
    comp = compare(["densenet_bc_fmnist"], dataset="mnist", epochs=3, budget="0.001s", out=str(tmp_path),
                   name="b", progress=False, train_args=["--data-dir", str(data_dir), "--batch-size", "32"])
    summary = json.loads((comp / "densenet_bc_fmnist" / "summary.json").read_text())
    # The plan made from the first epoch's steps is that one epoch (--epochs 3 is only the most).
    assert summary["epochs_done"] == 1 and summary["epochs_planned"] == 1


def test_report_counts_the_partial_epoch_of_a_budget(data_dir, tmp_path):
    # 32 steps of 4 images per epoch: a 1 ms budget ends the plan at twice the steps done when it is first
    # made (6), inside the first epoch.
    comp = compare(["densenet_bc_fmnist"], dataset="mnist", epochs=3, budget="0.001s", val_split=16.0,
                   out=str(tmp_path), name="p", progress=False,
                   train_args=["--data-dir", str(data_dir), "--batch-size", "4"])
    row = next(line for line in (comp / "report.md").read_text().splitlines()
               if line.startswith("| densenet_bc_fmnist |"))
    assert row.endswith("| 0.21 |"), row  # 24 of the 112 training images
    assert "val_split=16." in (comp / "report.md").read_text()  # a count, not 16.0


def test_parse_budget_and_unknown_model(tmp_path):
    assert parse_budget("10m") == 600 and parse_budget("1.5h") == 5400 and parse_budget("90") == 90
    with pytest.raises(ValueError, match="budget must look like"):
        parse_budget("ten minutes")
    with pytest.raises(ValueError, match="unknown model 'resnet19'"):
        compare(["resnet19"], out=str(tmp_path))
