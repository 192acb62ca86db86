"""`moderncnn bench`: the side-by-side table, for networks with and without a torchvision twin."""
import re

import pytest

import moderncnn
from moderncnn.report.summary import count_parameters
from moderncnn.bench import has_torchvision_counterpart, run_benchmark


def test_bench_pairs_torchvision_twins_and_measures_our_own_networks_alone():
    assert has_torchvision_counterpart("resnet18") and has_torchvision_counterpart("densenet_bc_100")
    assert not has_torchvision_counterpart("densenet_bc_cifar") and not has_torchvision_counterpart("nin")
    printed = []
    rows = run_benchmark(["densenet_bc_cifar", "resnet18"], input_size=(3, 32, 32), batch=2, steps=1,
                         eval_batch=2, isolate=False, out=printed.append, repeats=1)
    ours, paired = rows
    assert "tv_train" not in ours and "tv_eval" not in ours
    assert ours["ours_train"]["images_per_second"] > 0 and ours["ours_train_me"]["images_per_second"] > 0
    assert paired["tv_train"]["impl"] == "torchvision" and paired["ours_train"]["impl"] == "moderncnn"
    assert "tv_train_cl" in paired and "tv_train_cl" not in ours  # torchvision channels-last: the vs tv-CL column
    text = "\n".join(printed)
    assert "densenet_bc_cifar (cpu, input 3x32x32, train batch 2, eval batch 2): no torchvision counterpart" in text
    assert "torchvision train" in text.split("resnet18")[1] and text.count("optimize_for_inference") == 2
    resnet = text.split("resnet18")[1]
    assert "vs tv-CL" in resnet and "torchvision train, channels-last" in resnet
    ratio_lines = [l for l in resnet.splitlines() if l.strip().startswith("moderncnn train")]
    assert ratio_lines and len(re.findall(r"\d\.\d\dx", ratio_lines[0])) == 3  # vs tv, vs tv-CL, memory vs tv


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_bench_under_autocast_adds_a_vs_fp32_column(amp):
    printed = []
    rows = run_benchmark(["resnet18"], input_size=(3, 32, 32), batch=2, steps=1, eval_batch=2, isolate=False,
                         out=printed.append, repeats=1, amp=amp)
    ours = rows[0]["ours_train"]
    assert ours["fp32_images_per_second"] > 0 and rows[0]["tv_train"]["fp32_images_per_second"] > 0
    header, *lines = [l for l in printed[0].splitlines() if l.strip()][1:]
    assert "vs fp32" in header
    train_line = next(l for l in lines if l.strip().startswith("moderncnn train"))
    assert len(re.findall(r"\d\.\d\dx", train_line)) == 4  # vs fp32, vs tv, vs tv-CL, memory vs tv
    with pytest.raises(ValueError, match="amp must be bf16, fp16 or off"):
        run_benchmark(["resnet18"], amp="fp8", isolate=False, out=printed.append)


@pytest.mark.slow
def test_memory_is_measured_pinned_and_as_run_in_fresh_processes():
    from moderncnn.bench import _measure_isolated
    r = _measure_isolated(dict(impl="moderncnn", name="densenet_bc_cifar", mode="train_me", input_size=[3, 32, 32],
                               batch=2, steps=1, warmup=1))
    # densenet_bc_cifar's weights, gradients and momentum alone take 3 x 4 bytes a parameter; a process with
    # torch loaded holds well over 50 MB more.
    floor = 12 * count_parameters(moderncnn.create_model("densenet_bc_cifar", num_classes=10)) / 2**20
    assert floor + 50 < r["peak_mb"] < 64 * 1024 and floor + 50 < r["peak_mb_as_run"] < 64 * 1024


def test_pinning_glibc_mmap_threshold():
    import platform
    from moderncnn.training.malloc import pin_mmap_threshold
    assert pin_mmap_threshold() == (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_interleaved_densenet_benchmark_prints_every_configuration():
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "densenet_interleaved.py"
    run = subprocess.run([sys.executable, str(script), "--model", "densenet_bc_100", "--input", "3x32x32",
                          "--batch", "4", "--configs", "ours,ours-shared,ours-me", "--rounds", "2"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("densenet_bc_100, input 3x32x32, batch 4, 2 rounds")
    assert [line.split()[0] for line in lines[1:]] == ["ours", "ours-shared", "ours-me"]
    assert lines[1].rstrip().endswith("1.00x ours")
