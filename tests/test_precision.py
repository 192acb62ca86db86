"""Mixed precision: the one decision per device, float16 with a gradient scaler, evaluation under autocast."""
import csv
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import moderncnn
from moderncnn.runs import TrainConfig, normalize_amp
from moderncnn.training import NonFiniteLossError, TrainingInterrupted, load_checkpoint, resolve_config
from moderncnn import hardware
from moderncnn.training.precision import ScaledBackward, apply_fp32_precision, resolve_precision

from helpers import CtrlCAtStep, make_mnist, tiny

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
# float16 convolution backward runs on a slow reference kernel on CPUs: the float16 runs train a tiny DenseNet.
FP16 = dict(amp="fp16", model_kwargs=dict(growth_rate=4, block_config=(2, 2)))


# --- the decision ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("capability, kind, scaled, words", [
    ((9, 0), "bf16", False, "bfloat16 autocast (the GPU has compute capability 9.0)"),
    ((8, 0), "bf16", False, "bfloat16 autocast (the GPU has compute capability 8.0)"),
    ((7, 5), "fp16", True, "float16 autocast + GradScaler (the GPU has compute capability 7.5, below 8.0: "
                           "no native bfloat16)"),
    ((6, 0), "fp16", True, "float16 autocast + GradScaler (the GPU has compute capability 6.0, below 8.0"),
])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, kind, scaled, words):
    monkeypatch.setattr(hardware, "cuda_capability", lambda device: capability)
    chosen = resolve_precision("auto", CUDA)
    assert (chosen.kind, chosen.scaler) == (kind, scaled)
    assert chosen.description.startswith(words)


@pytest.mark.parametrize("feature", ["AMX", "AVX512-BF16", None])
def test_auto_on_the_cpu_takes_bfloat16_only_where_it_is_native(monkeypatch, feature):
    monkeypatch.setattr(hardware, "cpu_bf16_feature", lambda: feature)
    chosen = resolve_precision("auto", CPU)
    if feature:
        assert chosen.dtype == torch.bfloat16 and not chosen.scaler
        assert chosen.description == f"bfloat16 autocast (the CPU has {feature})"
    else:
        assert chosen.dtype is None
        assert chosen.description == ("float32 (this CPU has no native bfloat16; bf16 would be emulated)")


def test_explicit_choices_hold_on_every_device(monkeypatch):
    monkeypatch.setattr(hardware, "cuda_capability", lambda device: (7, 0))
    for device in (CPU, CUDA):
        assert resolve_precision("off", device).dtype is None
        fp16 = resolve_precision("fp16", device)
        assert fp16.dtype == torch.float16 and fp16.scaler
    with pytest.warns(UserWarning, match="--amp bf16: this CPU has no native bfloat16, so bfloat16 is emulated"):
        emulated = resolve_precision("bf16", CPU)
    assert emulated.dtype == torch.bfloat16
    with pytest.warns(UserWarning, match="compute capability 7.0, below 8.0, so bfloat16 is emulated"):
        resolve_precision("bf16", CUDA)
    monkeypatch.setattr(hardware, "cpu_bf16_feature", lambda: "AMX")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native: no warning
        assert resolve_precision("bf16", CPU).description == "bfloat16 autocast (the CPU has AMX)"


def test_amp_values_old_and_new():
    assert [normalize_amp(v) for v in (True, False, "auto", None, "bf16", "fp16", "off", "FP16")] == [
        "auto", "off", "auto", "auto", "bf16", "fp16", "off", "fp16"]
    with pytest.raises(ValueError, match="amp must be one of auto, bf16, fp16, off, got 'sometimes'"):
        TrainConfig(amp="sometimes")
    assert TrainConfig().amp == "auto"
    assert TrainConfig.from_dict({"amp": False}).amp == "off"  # a format-2 run file


def test_amp_flag_forms():
    from moderncnn.cli import build_parser, config_from_args
    parser = build_parser()
    for argv, want in [(["--amp"], "auto"), (["--amp", "fp16"], "fp16"), (["--amp", "bf16"], "bf16"),
                       (["--amp", "off"], "off"), (["--no-amp"], "off"), ([], "auto")]:
        values, explicit = config_from_args(parser.parse_args(["train", *argv]))
        assert TrainConfig.from_dict(values).amp == want and (("amp" in explicit) == bool(argv)), argv
    proc = subprocess.run([sys.executable, "-m", "moderncnn", "train", "--amp", "yes"], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert "--amp must be one of auto, bf16, fp16, off, got 'yes'" in proc.stderr
    assert resolve_config(TrainConfig(recipe="cifar10", amp="off"), explicit={"amp"}).amp == "off"


def test_recipes_default_to_auto_or_say_why_not():
    from moderncnn.training.config import RECIPES
    assert resolve_config(TrainConfig()).amp == "auto"  # the default run
    for name in ("cifar10", "cifar10-speedrun", "cifar10-gpu", "fmnist-best-gpu"):
        assert resolve_config(TrainConfig(recipe=name)).amp == "auto", name
    assert {n for n, r in RECIPES.items() if r.settings.get("amp") == "off"} == {"d2l", "mnist", "fmnist-best"}


# --- the scaled step ---------------------------------------------------------------------------------------

def test_an_overflowing_step_is_skipped_and_the_scale_backs_off():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = ScaledBackward(torch.amp.GradScaler("cpu", init_scale=2.0 ** 127))
    loss = (model(torch.randn(8, 4)) * 1e6).square().mean()  # scaled, it overflows float32
    assert step.step(loss, opt).item() == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the weights are untouched
    assert step.scaler.get_scale() == 2.0 ** 126
    loss = model(torch.randn(8, 4)).square().mean()
    assert ScaledBackward(torch.amp.GradScaler("cpu")).step(loss, opt).item() == 0


def test_clipping_sees_the_unscaled_gradient():
    def one_step(scaler):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        loss = (model(torch.randn(8, 4)) * 100).square().mean()
        ScaledBackward(scaler).step(loss, opt, model.parameters(), grad_clip=0.5)
        return [p.detach() for p in model.parameters()]

    plain, scaled = one_step(None), one_step(torch.amp.GradScaler("cpu", init_scale=1024.0))
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- float16 runs on the CPU -------------------------------------------------------------------------------

def test_fp16_run_saves_the_scaler_and_reports_its_precision(data_dir, tmp_path):
    result = moderncnn.train(**tiny(data_dir, tmp_path, epochs=2, **FP16))
    run = tmp_path / "run"
    state = load_checkpoint(run / "last.pt")
    assert state["precision"] == "fp16" and state["scaler"]["scale"] > 0
    words = "float16 autocast + GradScaler (--amp fp16)"
    assert json.loads((run / "summary.json").read_text())["precision"] == words
    assert words in (run / "report.md").read_text()
    with open(run / "metrics.csv") as f:
        assert [r["skipped_steps"] for r in csv.DictReader(f)] == ["0", "0"]
    fp32 = moderncnn.train(**tiny(data_dir, tmp_path, epochs=2, **dict(FP16, amp="off"), name="fp32"))
    for a, b in zip(result.history, fp32.history):  # float16 follows float32's training closely
        assert a.train_loss == pytest.approx(b.train_loss, abs=0.02)


def test_fp16_mid_epoch_resume_is_exact(data_dir, tmp_path):
    straight = moderncnn.train(**tiny(data_dir, tmp_path / "a", **FP16))
    with pytest.raises(TrainingInterrupted):  # the 8th step of 12: mid-way through epoch 2
        moderncnn.train(**tiny(data_dir, tmp_path / "b", **FP16), callbacks=[CtrlCAtStep(8)])
    assert load_checkpoint(tmp_path / "b" / "run" / "last.pt")["scaler"] is not None
    resumed = moderncnn.train(resume=str(tmp_path / "b" / "run"), progress=False)
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert getattr(resumed.history[-1], key) == pytest.approx(getattr(straight.history[-1], key), rel=1e-5,
                                                                 abs=1e-6)
    a = load_checkpoint(tmp_path / "a" / "run" / "last.pt")
    b = load_checkpoint(tmp_path / "b" / "run" / "last.pt")
    assert a["scaler"] == b["scaler"]
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)


def test_skipped_steps_are_counted_not_fatal(data_dir, tmp_path, monkeypatch):
    # A scale far too large: the first steps overflow until the scaler has halved it enough.
    from moderncnn.training import setup as train_setup
    monkeypatch.setattr(train_setup, "make_grad_scaler",
                        lambda chosen, device: torch.amp.GradScaler("cpu", init_scale=2.0 ** 24))
    result = moderncnn.train(**tiny(data_dir, tmp_path, epochs=2, **FP16))
    skipped = sum(r.skipped_steps for r in result.history)
    assert 1 <= skipped < 12
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_steps"] == skipped
    assert f"the gradient scaler skipped {skipped} steps" in (tmp_path / "run" / "report.md").read_text()


def test_a_loss_that_stays_non_finite_still_stops_an_fp16_run(data_dir, tmp_path):
    with pytest.raises(NonFiniteLossError, match="steps in a row after the float16 scale backed off"):
        moderncnn.train(**tiny(data_dir, tmp_path, lr=1e12, epochs=1, batch_size=16, label_smoothing=0.0,
                               **FP16))


@pytest.mark.parametrize("extra", [dict(optimizer="muon"), dict(ema=0.9), dict(grad_clip=1.0)])
def test_muon_ema_and_clipping_train_under_the_scaler(data_dir, tmp_path, extra):
    result = moderncnn.train(**tiny(data_dir, tmp_path, **FP16, **extra))
    first, last = result.history
    assert last.train_loss < first.train_loss and last.skipped_steps == 0
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_resume_under_another_precision_is_refused(data_dir, tmp_path):
    moderncnn.train(**tiny(data_dir, tmp_path, epochs=1, **FP16))
    with pytest.raises(ValueError, match=r"amp: fp16 -> bf16"):
        moderncnn.train(resume=str(tmp_path / "run"), epochs=2, amp="bf16", progress=False)


def test_auto_without_native_bf16_is_float32_bit_for_bit(data_dir, tmp_path):
    auto = moderncnn.train(**tiny(data_dir, tmp_path, epochs=1, amp="auto", name="auto"))
    off = moderncnn.train(**tiny(data_dir, tmp_path, epochs=1, amp="off", name="off"))
    assert auto.history[0].train_loss == off.history[0].train_loss
    a, b = (load_checkpoint(tmp_path / n / "last.pt")["model"] for n in ("auto", "off"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["precision"].startswith("float32 (")


def test_bfloat16_run_records_why(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16_feature", lambda: "AMX")  # oneDNN emulates it where it is not
    moderncnn.train(**tiny(data_dir, tmp_path, epochs=1))
    words = "bfloat16 autocast (the CPU has AMX)"
    for name in ("summary.json", "config.json"):
        assert json.loads((tmp_path / "run" / name).read_text())["precision"] == words
    assert words in (tmp_path / "run" / "report.md").read_text()


# --- evaluation under the same autocast --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_evaluation_under_autocast_agrees_with_float32(data_dir, tmp_path, dtype):
    from moderncnn.data import Loader, load_dataset
    from moderncnn.training.loop import evaluate
    moderncnn.train(**tiny(data_dir, tmp_path, epochs=2, amp="off"))
    model = moderncnn.load_model(tmp_path / "run")
    test = load_dataset("mnist", root=str(data_dir), split="test")
    loader = Loader(test, 64, train=False, image_size=28, mean=model.preprocessing["mean"],
                    std=model.preprocessing["std"])
    _, _, exact, probs32 = evaluate(model, loader, return_predictions=True)
    for tta in (0, 2):
        loss, _, mixed, probs = evaluate(model, loader, tta=tta, amp_dtype=dtype, return_predictions=True)
        assert probs.dtype == torch.float32 and torch.isfinite(torch.tensor(loss))
        if tta == 0:
            assert (mixed == exact).float().mean() >= 0.99


# --- float32 matrix products, DDP --------------------------------------------------------------------------

def test_fp32_precision_setting_is_applied_and_recorded(data_dir, tmp_path):
    try:
        apply_fp32_precision("high")
        assert torch.get_float32_matmul_precision() == "high"
        with pytest.raises(ValueError, match="fp32_precision must be one of highest, high, medium"):
            resolve_config(TrainConfig(fp32_precision="low"))
        moderncnn.train(**tiny(data_dir, tmp_path, epochs=1, fp32_precision="medium", amp="off"))
        assert torch.get_float32_matmul_precision() == "medium"
        saved = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
        assert saved["fp32_precision"] == "medium"
        assert "float32 matrix products: medium" in (tmp_path / "run" / "report.md").read_text()
    finally:
        apply_fp32_precision("highest")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_gloo_processes_train_in_fp16(tmp_path):
    from test_distributed import _free_port
    data = make_mnist(tmp_path / "data", n_train=128, n_test=64, learnable=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                          "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "moderncnn", "train",
                          "--dataset", "mnist", "--data-dir", str(data), "--epochs", "2", "--batch-size", "32",
                          "--augment", "none", "--model-arg", "growth_rate=4", "--model-arg", "block_config=(2,2)",
                          "--amp", "fp16", "--no-progress", "--out", str(tmp_path), "--name", "ddp"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "float16 autocast + GradScaler" in ddp.stdout
    state = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert state["scaler"]["scale"] > 0 and state["precision"] == "fp16"
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="Debian's dataset-fashion-mnist "
                    "is not installed")
def test_the_default_runs_predictions_agree_under_bfloat16(tmp_path):
    from moderncnn.data import Loader, load_dataset
    from moderncnn.training.loop import evaluate
    moderncnn.train(epochs=1, amp="off", out=str(tmp_path), name="run", progress=False, quiet=True)
    model = moderncnn.load_model(tmp_path / "run").to(memory_format=torch.channels_last)
    test = load_dataset("fashion-mnist", split="test")
    loader = Loader(test, 256, train=False, image_size=28, mean=model.preprocessing["mean"],
                    std=model.preprocessing["std"], channels_last=True)
    _, _, exact, _ = evaluate(model, loader, return_predictions=True)
    _, _, mixed, _ = evaluate(model, loader, amp_dtype=torch.bfloat16, return_predictions=True)
    assert (mixed == exact).float().mean() >= 0.99
