"""Test-time augmentation levels and the patch-whitening initialisation."""
import csv

import pytest
import torch
from torch import nn

import moderncnn
from moderncnn.runs import UsageError
from moderncnn.training import TrainConfig, resolve_config
from moderncnn.training.init import whiten_first_conv
from moderncnn.training.loop import evaluate, tta_logits, tta_views

from helpers import make_mnist


def test_tta_views_are_flips_and_one_pixel_shifts():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6)
    assert [w for w, _ in tta_views(x, 0)] == [1.0]
    level1 = tta_views(x, 1)
    assert torch.equal(level1[1][1], x.flip(3)) and sum(w for w, _ in level1) == 1.0
    level2 = tta_views(x, 2)
    assert len(level2) == 6 and sum(w for w, _ in level2) == pytest.approx(1.0)
    up_left, down_right = level2[2][1], level2[4][1]
    assert up_left.shape == down_right.shape == x.shape
    # shifted one pixel: the content moves down-right in the up-left crop, and back in the other
    assert torch.equal(up_left[..., 1:, 1:], x[..., :-1, :-1])
    assert torch.equal(down_right[..., :-1, :-1], x[..., 1:, 1:])
    # reflect padding: the new border row repeats the image's second row, not zeros
    assert torch.equal(up_left[..., 0, 1:], x[..., 1, :-1])
    assert torch.equal(level2[5][1], down_right.flip(3))


def test_tta_logits_are_the_weighted_mean_over_views():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(3)).eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        model(x)
        expected = sum(w * model(v) for w, v in tta_views(x, 2))
        assert torch.allclose(tta_logits(model, x, 2), expected, atol=1e-6)
        assert torch.allclose(tta_logits(model, x, True), (model(x) + model(x.flip(3))) / 2, atol=1e-6)


class _CountingModel(nn.Module):
    """A position-sensitive linear model that counts the images it is given."""

    def __init__(self):
        super().__init__()
        self.net, self.images = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)), 0

    def forward(self, x):
        self.images += len(x)
        return self.net(x)


def test_selective_tta_gives_the_views_only_to_the_doubtful_images():
    torch.manual_seed(0)
    model, x = _CountingModel().eval(), torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        model.net[1].weight.mul_(torch.linspace(0.1, 3, 3).view(3, 1))  # a spread of confidences
        plain, full = model(x), tta_logits(model, x, 2)
        top = plain.softmax(1).amax(1)
        below = float(top.median())
        doubtful = top < below
        assert 0 < int(doubtful.sum()) < len(x)
        model.images = 0
        selective = tta_logits(model, x, 2, below=below)
    # the plain pass for all, then five more views of the doubtful ones only
    assert model.images == len(x) + 5 * int(doubtful.sum())
    assert torch.allclose(selective[doubtful], full[doubtful], atol=1e-6)
    assert torch.equal(selective[~doubtful], plain[~doubtful])
    with torch.no_grad():
        assert torch.equal(tta_logits(model, x, 2, below=1e-9), plain)  # nobody in doubt: no views
        assert torch.allclose(tta_logits(model, x, 2, below=1.0), full, atol=1e-6)


def test_tta_below_is_checked_and_named_in_the_report(tmp_path):
    with pytest.raises(UsageError, match=r"tta_below must be in \(0, 1\]"):
        resolve_config(TrainConfig(tta=2, tta_below=0.0))
    data_dir = make_mnist(tmp_path / "mnist", n_train=128, n_test=64, learnable=True)
    result = moderncnn.train(dataset="mnist", data_dir=str(data_dir), model="densenet_bc_fmnist", epochs=1,
                             batch_size=64, out=str(tmp_path), name="run", progress=False, augment="none", tta=2,
                             tta_below=0.9)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "for the images whose plain top probability is under 0.9" in report
    assert f"--tta 2 --tta-below 0.9`" in report
    preds = torch.load(tmp_path / "run" / "predictions.pt", weights_only=True)
    assert (preds["predictions"] == preds["labels"]).float().mean().item() == pytest.approx(result.final_acc)


def test_evaluate_tta_level_changes_only_a_position_sensitive_model():
    from moderncnn.data import Loader
    from moderncnn.data.datasets import ImageDataset
    torch.manual_seed(0)
    images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8)
    data = ImageDataset(images, torch.randint(0, 3, (20,)), [str(i) for i in range(3)], "generated", "test")
    loader = Loader(data, 8, train=False)
    pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 3))  # sees the mean only
    for level in (1, 2):
        # flips keep the mean; the one-pixel shifts with reflect padding change it a little
        tol = 1e-6 if level == 1 else 0.05
        assert evaluate(pooled, loader, tta=level)[0] == pytest.approx(evaluate(pooled, loader)[0], abs=tol)
    positional = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    assert evaluate(positional, loader, tta=2)[0] != pytest.approx(evaluate(positional, loader)[0], abs=1e-6)


def test_only_the_last_epoch_is_scored_with_tta(tmp_path):
    data_dir = make_mnist(tmp_path / "mnist", n_train=256, n_test=96, learnable=True)
    result = moderncnn.train(dataset="mnist", data_dir=str(data_dir), model="densenet_bc_fmnist", epochs=3,
                             batch_size=64, lr=0.2, out=str(tmp_path), name="run", progress=False,
                             augment="none", tta=2)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["tta"] for r in rows] == ["0", "0", "2"]
    preds = torch.load(tmp_path / "run" / "predictions.pt", weights_only=True)
    # the report's predictions are the last epoch's (level-2) evaluation, not a second pass
    assert preds["test_acc"] == pytest.approx(result.final_acc)
    assert (preds["predictions"] == preds["labels"]).float().mean().item() == pytest.approx(result.final_acc)
    model = moderncnn.load_model(tmp_path / "run")
    from moderncnn.data import Loader, load_dataset
    test = load_dataset("mnist", str(data_dir), split="test")
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    norm = state["normalization"]
    loader = Loader(test, 64, train=False, mean=norm["mean"], std=norm["std"])
    assert evaluate(model, loader, tta=2)[1] == pytest.approx(result.final_acc)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "TTA level 2" in report and f"{result.final_acc:.4f} (TTA 2)" in report
    assert report.count("(TTA 2)") == 1 and "eval " in report and "--tta 2" in report


def test_tta_and_init_are_validated():
    with pytest.raises(ValueError, match="tta must be 0"):
        resolve_config(TrainConfig(tta=3))
    with pytest.raises(ValueError, match="init must be xavier or whiten"):
        resolve_config(TrainConfig(init="orthogonal"))
    assert resolve_config(TrainConfig(recipe="cifar10")).tta == 2


def test_tta_flag_alone_is_flip_and_takes_a_level():
    from moderncnn.cli import build_parser
    parser = build_parser()
    assert parser.parse_args(["train", "--tta"]).tta == 1
    assert parser.parse_args(["train", "--tta", "2"]).tta == 2
    assert parser.parse_args(["train", "--init", "whiten"]).init == "whiten"
    assert parser.parse_args(["eval", "run", "--tta", "2"]).tta == 2


def test_whitened_first_conv_decorrelates_patches():
    torch.manual_seed(0)
    # correlated channels and smooth images: far from white
    base = torch.rand(300, 1, 12, 12)
    base = nn.functional.avg_pool2d(base, 3, stride=1, padding=1)
    images = (torch.cat([base, 0.7 * base + 0.3 * torch.rand_like(base), base.flip(2)], 1) * 255).to(torch.uint8)
    mean, std = [0.5, 0.5, 0.5], [0.1, 0.1, 0.1]
    conv = nn.Conv2d(3, 64, 3, bias=False)
    model = nn.Sequential(conv, nn.ReLU())
    model.first_conv = "0"  # the model contract's name of the first convolution
    before = conv.weight[54:].clone()
    assert whiten_first_conv(model, images, mean, std) is conv
    x = (images.float() / 255 - 0.5) / 0.1
    out = nn.functional.conv2d(x, conv.weight[:27]).transpose(0, 1).reshape(27, -1)
    cov = torch.cov(out.double())
    # white up to the eps regulariser, which damps only the weakest directions
    assert torch.allclose(cov[:20, :20], torch.eye(20, dtype=cov.dtype), atol=0.05)
    assert torch.equal(conv.weight[27:54], -conv.weight[:27])  # each filter beside its negation
    assert torch.equal(conv.weight[54:], before)  # filters beyond 2 x 27 keep their initialisation


def test_whiten_init_trains_and_rejects_grouped_convs(tmp_path):
    data_dir = make_mnist(tmp_path / "mnist", n_train=128, n_test=64, learnable=True)
    result = moderncnn.train(dataset="mnist", data_dir=str(data_dir), model="densenet_bc_fmnist", epochs=1,
                             batch_size=64, out=str(tmp_path), name="run", progress=False, init="whiten")
    assert result.config.init == "whiten" and 0 <= result.final_acc <= 1
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    grouped.first_conv = "0"
    with pytest.raises(ValueError, match="groups=1"):
        whiten_first_conv(grouped, torch.zeros(4, 4, 8, 8, dtype=torch.uint8), [0.0] * 4, [1.0] * 4)
