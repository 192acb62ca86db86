"""The CIFAR-10 speed run: the airbench network, its recipe, and the trainer features it needs (per-group
learning rates, a bias trained for the first steps only, frozen parameters, Muon's filter renormalisation)."""
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import moderncnn
from moderncnn.models.vgg import AirbenchVGG
from moderncnn.training.budget import TrainingPlan
from moderncnn.training import resolve_config
from moderncnn.training.optim import LRSchedule, Muon, build_optimizer
from moderncnn.runs import TrainConfig, load_model

sys.path.insert(0, str(Path(__file__).parent))
from test_data import make_cifar_python  # noqa: E402


def test_airbench_network_shape_and_frozen_parts():
    net = moderncnn.create_model("vgg_airbench")
    assert net.whiten.weight.shape == (24, 3, 2, 2) and not net.whiten.weight.requires_grad
    assert net.whiten.bias.requires_grad
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6 and all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    assert all(m.momentum == pytest.approx(0.4) and m.eps == 1e-12 for m in norms)
    widths = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)][1:]
    assert widths == [64, 64, 256, 256, 256, 256]
    assert net.head.bias is None and net.head.weight.std().item() == pytest.approx(1.0, rel=1e-5)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert net.min_input_size == (3, 9, 9)


def test_airbench_convs_start_as_identity_and_head_is_scaled():
    net = AirbenchVGG(num_classes=4, in_chans=1, widths=(8, 16, 16))
    conv = net.features[1][0]  # the first group's first conv: 8 whitening channels in, 8 out
    x = torch.randn(2, conv.in_channels, 6, 6)
    assert torch.allclose(conv(x), x, atol=1e-6)
    second = net.features[2][4]  # 16 -> 16: identity on all of them
    y = torch.randn(2, 16, 5, 5)
    assert torch.allclose(second(y), y, atol=1e-6)
    features = torch.randn(3, 16, 2, 2)
    expected = net.head(features.amax((2, 3))) / 16
    assert torch.allclose(net.forward_head(features), expected)


def test_speedrun_recipe_resolves_to_the_airbench_method():
    cfg = resolve_config(TrainConfig(recipe="cifar10-speedrun"))
    assert (cfg.model, cfg.dataset, cfg.optimizer, cfg.schedule, cfg.init) == (
        "vgg_airbench", "cifar10", "muon", "linear", "whiten")
    assert (cfg.muon_lr, cfg.muon_momentum, cfg.muon_normalize, cfg.momentum) == (0.24, 0.6, True, 0.85)
    assert cfg.batch_size >= 1000 and cfg.lr == pytest.approx(0.67 * cfg.batch_size)
    assert cfg.bias_lr == pytest.approx(0.053 * cfg.batch_size)
    assert (cfg.label_smoothing, cfg.augment, cfg.tta, cfg.first_conv_bias_epochs) == (0.2, "crop2+altflip", 2, 3)
    assert cfg.amp == "auto" and cfg.channels_last
    # tuned on validation: epochs 1-2 at 24x24, 3-4 at 28x28; TTA for the images under 0.7 only
    assert (cfg.progressive_size, cfg.progressive_fraction, cfg.tta_below) == (24, 0.5, 0.7)
    assert "muon lr 0.24 momentum 0.6" in cfg.describe_optimizer() and "norms and biases at lr 53" in cfg.describe_optimizer()


def test_linear_schedule_decays_to_zero():
    schedule = LRSchedule("linear", 100)
    assert [schedule(s) for s in (0, 50, 100)] == [1.0, 0.5, 0.0]


def test_bias_lr_and_a_bias_that_trains_for_its_first_steps_only():
    net = AirbenchVGG(widths=(8, 8, 8))
    cfg = resolve_config(TrainConfig(recipe="cifar10-speedrun", epochs=4, first_conv_bias_epochs=1))
    opt = build_optimizer(net, "muon", cfg.lr, cfg.weight_decay, cfg.momentum, muon_lr=cfg.muon_lr,
                          bias_lr=cfg.bias_lr, muon_momentum=cfg.muon_momentum, muon_normalize=True,
                          train_steps={net.whiten.bias: 10})
    by_kind = {(g["muon"], g["no_decay"], g.get("train_steps", 0)): g for g in opt.param_groups}
    assert by_kind[(False, True, 10)]["params"] == [net.whiten.bias]
    assert by_kind[(False, True, 0)]["lr"] == cfg.bias_lr  # the BatchNorm shifts
    assert by_kind[(False, False, 0)]["lr"] == cfg.lr and by_kind[(False, False, 0)]["params"] == [net.head.weight]
    assert by_kind[(True, False, 0)]["lr"] == 0.24 and by_kind[(True, False, 0)]["momentum"] == 0.6
    assert all(p is not net.whiten.weight for g in opt.param_groups for p in g["params"])  # frozen: not optimised
    plan = TrainingPlan(cfg, steps_per_epoch=10, image_size=32, train_images=100, eval_images=10)
    scheduler = plan.scheduler(opt)
    factors = []
    for step in range(12):
        factors.append([g["lr"] / g["initial_lr"] for g in opt.param_groups])
        opt.step()
        scheduler.step()
    bias_group, other = (next(i for i, g in enumerate(opt.param_groups) if g is by_kind[key])
                         for key in ((False, True, 10), (False, True, 0)))
    assert [round(f[bias_group], 3) for f in factors[:3]] == [1.0, 0.9, 0.8]
    assert factors[10][bias_group] == factors[11][bias_group] == 0.0
    assert factors[10][other] == pytest.approx(1 - 10 / 40)  # the rest decays over the whole run


def test_muon_normalize_pins_each_filter_bank_norm():
    conv = nn.Conv2d(4, 6, 3, bias=False)
    opt = Muon([{"params": [conv.weight], "muon": True, "normalize": True}], lr=0.1, momentum=0.6)
    conv.weight.data.mul_(10)
    conv.weight.grad = torch.randn_like(conv.weight)
    opt.step()
    # renormalised to sqrt(6) before the orthogonal step of length about 0.1 * sqrt(min(6, 36))
    assert abs(conv.weight.norm().item() - math.sqrt(6)) < 0.1 * math.sqrt(6) + 1e-3


def test_speedrun_recipe_trains_on_cifar_files(tmp_path):
    make_cifar_python(tmp_path / "data", n=60)
    result = moderncnn.train(recipe="cifar10-speedrun", data_dir=str(tmp_path / "data"), epochs=3, batch_size=20,
                             lr=0.67 * 20, bias_lr=0.053 * 20, first_conv_bias_epochs=1, val_split=20,
                             model_kwargs=dict(widths=(8, 16, 16)), out=str(tmp_path), name="run", progress=False)
    assert result.config.model == "vgg_airbench" and len(result.history) == 3
    assert 0 <= result.final_acc <= 1 and result.val_acc is not None
    model = load_model(tmp_path / "run")
    fresh = AirbenchVGG(widths=(8, 16, 16))
    # the whitening filters were set from the images and stayed frozen: eigenvectors and their negations
    assert not torch.allclose(model.whiten.weight, fresh.whiten.weight)
    assert torch.allclose(model.whiten.weight[:12], -model.whiten.weight[12:])
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)


def test_first_conv_bias_epochs_needs_a_bias(tmp_path):
    make_cifar_python(tmp_path / "data", n=20)
    with pytest.raises(ValueError, match="has no trainable bias"):
        moderncnn.train(dataset="cifar10", data_dir=str(tmp_path / "data"), model="resnet18", epochs=1,
                        model_kwargs=dict(small_input=True), first_conv_bias_epochs=1, out=str(tmp_path),
                        progress=False, batch_size=10)


def test_speedrun_rates_and_whitening_belong_to_its_model():
    other = resolve_config(TrainConfig(recipe="cifar10-speedrun", model="densenet_bc_cifar"))
    assert (other.optimizer, other.schedule, other.batch_size, other.augment) == ("muon", "linear", 1000,
                                                                                 "crop2+altflip")
    assert other.init is None and other.bias_lr is None and not other.first_conv_bias_epochs
    assert other.lr == pytest.approx(0.1 * 1000 / 128)  # the default rate for the batch, not 670
    mine = resolve_config(TrainConfig(recipe="cifar10-speedrun", lr=500.0), explicit={"lr"})
    assert mine.lr == 500.0 and mine.bias_lr == 53.0


def test_model_arguments_scoped_to_one_model():
    kwargs = {"resnet18:small_input": True, "num_blocks": 2, "vgg_airbench:widths": (8, 8, 8)}
    resnet = resolve_config(TrainConfig(model="resnet18", model_kwargs=kwargs))
    assert resnet.model_kwargs == {"small_input": True, "num_blocks": 2}
    vgg = resolve_config(TrainConfig(model="vgg_airbench", model_kwargs=kwargs))
    assert vgg.model_kwargs == {"num_blocks": 2, "widths": (8, 8, 8)}


def test_speedrun_benchmark_trains_each_seed_and_prints_the_means(tmp_path):
    import json
    import subprocess

    from test_folders import make_folder

    data = make_folder(tmp_path / "cifar", classes=("cat", "dog", "ship"), n=10, size=(32, 32))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cifar_speedrun.py"
    out = subprocess.run([sys.executable, str(script), "--data-dir", str(data), "--runs", "2", "--val-split", "6",
                          "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "runs.json"), "--",
                          "--epochs", "2", "--batch-size", "8", "--lr", "5.4", "--bias-lr", "0.42",
                          "--model-arg", "widths=8,16,16",
                          "--cache-dir", str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CPU: " in out.stdout and "bfloat16 in hardware: " in out.stdout
    assert "mean over 2 runs: wall" in out.stdout and "validation " in out.stdout
    table = json.loads((tmp_path / "runs.json").read_text())
    assert [r["seed"] for r in table["runs"]] == [0, 1]
    assert table["extra"][-2:] == ["--cache-dir", str(tmp_path / "cache")] and table["native_bf16"] in (True, False)
    for row in table["runs"]:
        assert row["epochs"] == 2.0 and 0 <= row["test_acc"] <= 1 and row["val_acc"] is not None
        config = json.loads((Path(row["run_dir"]) / "config.json").read_text())["config"]
        assert (config["recipe"], config["val_split"], config["seed"]) == ("cifar10-speedrun", 6, row["seed"])


STAND_IN_ANCHOR = '''import json, os, sys
seed = int(os.environ["SEED"])
assert os.environ["RUNS"] == "1"
print("epoch lines the anchor prints")
with open(os.environ["ANCHOR_LOG"], "a") as log:
    log.write(f"anchor {seed}\\n")
print(json.dumps({"accuracy": [0.9 + seed / 100], "train_seconds": [100.0 + seed], "bf16": True, "cpu": "x"}))
'''


def test_speedrun_benchmark_against_the_anchor_interleaves_the_runs_and_prints_the_ratios(tmp_path):
    import json
    import os
    import subprocess

    from test_folders import make_folder

    data = make_folder(tmp_path / "cifar", classes=("cat", "dog", "ship"), n=10, size=(32, 32))
    anchor = tmp_path / "anchor.py"
    anchor.write_text(STAND_IN_ANCHOR)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "cifar_speedrun.py"
    command = [sys.executable, str(script), "--data-dir", str(data), "--runs", "2", "--first-seed", "3",
               "--val-split", "6", "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "side.json"),
               "--vs-anchor", "--anchor-script", str(anchor), "--",
               "--epochs", "1", "--batch-size", "8", "--model-arg", "widths=8,16,16",
               "--cache-dir", str(tmp_path / "cache")]
    env = dict(os.environ, ANCHOR_LOG=str(tmp_path / "anchor.log"))
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line.split()[:2] for line in out.stdout.splitlines()
             if line.split()[:1] in (["anchor"], ["moderncnn"]) and line.split()[1].isdigit()]
    assert lines == [["anchor", "3"], ["moderncnn", "3"], ["anchor", "4"], ["moderncnn", "4"]]  # interleaved
    assert (tmp_path / "anchor.log").read_text() == "anchor 3\nanchor 4\n"
    record = json.loads((tmp_path / "side.json").read_text())
    assert [(r["seed"], r["train_s"], round(r["test_acc"], 6)) for r in record["anchor_runs"]] == [
        (3, 103.0, 0.93), (4, 104.0, 0.94)]
    ours = sum(r["train_s"] for r in record["runs"]) / 2
    assert record["train_time_ratio"] == pytest.approx(ours / 103.5)
    ours_acc = sum(r["test_acc"] for r in record["runs"]) / 2
    assert record["accuracy_difference_points"] == pytest.approx(100 * (ours_acc - 0.935))
    assert f"training time {record['train_time_ratio']:.2f}x" in out.stdout
    assert "CPU: " in out.stdout and record["native_bf16"] in (True, False) and record["cpu"]

    anchor.write_text("import sys\nprint('no JSON here')\nsys.exit('airbench: AIRBENCH_GIT is not set')\n")
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == ("cifar_speedrun.py: the anchor run of seed 3 failed (exit 1): "
                                                   "airbench: AIRBENCH_GIT is not set")
