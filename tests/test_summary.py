"""summary(): totals against a hand count, depth handling, the CLI."""
import torch
from torch import nn

import moderncnn
from moderncnn.cli import main


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


def test_totals_match_a_hand_count():
    s = moderncnn.summary(Tiny(), (2, 1, 8, 8))
    # params: conv 4*1*3*3 + 4 = 40; linear 64*3 + 3 = 195
    assert s.total_params == 235
    # FLOPs (multiply-add = 2): conv 2 * (2*4*8*8) * 9 = 9216; linear 2 * 2*64*3 = 768
    assert s.total_flops == 9216 + 768
    rows = {r.name: r for r in s.rows}
    assert rows["features.0"].output_shape == (2, 4, 8, 8) and rows["features.0"].params == 40
    assert rows["features.0"].flops == 9216 and rows["fc"].flops == 768
    assert rows["features.2"].output_shape == (2, 4, 4, 4)
    # activations: conv 512 + relu 512 + pool 128 + fc 6 floats
    assert s.activation_bytes == (512 + 512 + 128 + 6) * 4
    assert s.output_shape == (2, 3)
    assert "Total params: 235" in str(s)
    assert [r["name"] for r in s.as_rows()] == ["features.0", "features.1", "features.2", "fc"]


def test_depth_one_is_block_by_block():
    model = moderncnn.create_model("densenet_d2l", num_classes=10, in_chans=1)
    s = moderncnn.summary(model, (1, 1, 96, 96), depth=1)
    names = [r.name for r in s.rows]
    assert names[:5] == ["features.conv0", "features.norm0", "features.relu0", "features.pool0",
                         "features.denseblock1"]
    assert "features.denseblock1.denselayer1" not in names
    shapes = {r.name: r.output_shape for r in s.rows}
    assert shapes["features.denseblock1"] == (1, 192, 24, 24) and shapes["features.transition3"] == (1, 120, 3, 3)
    full = moderncnn.summary(model, (1, 1, 96, 96))
    assert full.total_params == s.total_params == sum(p.numel() for p in model.parameters())
    assert len(full.rows) > len(s.rows)


def test_summary_cli(capsys):
    assert main(["summary", "densenet121", "--input", "1x96x96", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "features.denseblock4" in out and "Total params: 6,957,834" in out
    assert main(["summary", "resnet18", "--input", "1x16x16"]) == 2
    assert "resnet18 needs inputs of at least 32x32" in capsys.readouterr().err


def test_models_cli_lists_counts(capsys):
    assert main(["models", "densenet12*"]) == 0
    out = capsys.readouterr().out
    assert "densenet121" in out and "7,978,856" in out and "yes" in out
    assert main(["models", "densenet_bc_fmnist"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row == ["densenet_bc_fmnist", "192,042", "10", "1x28x28", "8x8"]
