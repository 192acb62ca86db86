"""Pretrained weights through a local HTTP server, adaptation to num_classes/in_chans, freezing, fine-tuning."""
import hashlib
import http.server
import threading
from functools import partial

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from moderncnn import create_model, list_models
from moderncnn.models import pretrained as pt


@pytest.fixture
def hub(tmp_path, monkeypatch):
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"


@pytest.fixture
def server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(served)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{httpd.server_port}"
    httpd.shutdown()


def _publish(served, name, state):
    tmp = served / "tmp.pth"
    torch.save(state, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    final = served / f"{name}-{digest[:8]}.pth"
    tmp.rename(final)
    return final.name


def test_list_models_pretrained():
    names = list_models(pretrained=True)
    assert "densenet121" in names and "resnet50" in names and "densenet_bc_100" not in names
    assert set(names) <= set(list_models())


def test_download_from_local_server_gives_torchvision_logits(hub, server, monkeypatch):
    served, base = server
    reference = torchvision.models.resnet18().eval()
    filename = _publish(served, "resnet18", reference.state_dict())
    monkeypatch.setattr(pt, "weights_url", lambda name, tag="DEFAULT": f"{base}/{filename}")
    model = create_model("resnet18", pretrained=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    assert model.pretrained_cfg["crop"] == 224 and len(model.pretrained_cfg["mean"]) == 3
    assert (hub / "checkpoints" / filename).is_file()  # torch.hub's cache


def test_checksum_mismatch_is_an_error_and_not_kept(hub, server, monkeypatch):
    served, base = server
    filename = _publish(served, "resnet18", torchvision.models.resnet18().state_dict())
    wrong = "resnet18-00000000.pth"
    (served / filename).rename(served / wrong)
    monkeypatch.setattr(pt, "weights_url", lambda name, tag="DEFAULT": f"{base}/{wrong}")
    with pytest.raises(pt.PretrainedError, match="checksum mismatch"):
        create_model("resnet18", pretrained=True)
    assert not (hub / "checkpoints" / wrong).exists()


def test_offline_error_says_what_and_where(hub, monkeypatch):
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(pt, "weights_url", lambda name, tag="DEFAULT": f"http://127.0.0.1:{port}/densenet121-a639ec97.pth")
    with pytest.raises(pt.PretrainedError, match=r"could not download http://127.0.0.1:\d+/densenet121-a639ec97.pth"
                                                 r".*Put the file by hand at .*checkpoints/densenet121-a639ec97.pth"):
        create_model("densenet121", pretrained=True)


def test_no_weights_for_cifar_models():
    with pytest.raises(pt.PretrainedError, match="no ImageNet weights for densenet_bc_100"):
        create_model("densenet_bc_100", pretrained=True)


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_num_classes_and_in_chans_adaptation(name, tmp_path):
    reference = getattr(torchvision.models, name)().eval()
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    model = create_model(name, pretrained=str(path), num_classes=5, in_chans=1).eval()
    assert model.num_classes == 5 and model.in_chans == 1
    ours, theirs = model.state_dict(), reference.state_dict()
    first = "conv1.weight" if name.startswith("resnet") else "features.conv0.weight"
    head = "fc" if name.startswith("resnet") else "classifier"
    torch.testing.assert_close(ours[first], theirs[first].sum(1, keepdim=True))
    assert ours[f"{head}.weight"].shape == (5, theirs[f"{head}.weight"].shape[1])
    for key, value in theirs.items():  # every other layer is kept exactly
        if key not in (first, f"{head}.weight", f"{head}.bias"):
            assert torch.equal(ours[key], value), key
    # A grey image through the summed filters equals the RGB network on that image repeated 3 times.
    grey = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        if name.startswith("resnet"):
            a = model.layer4(model.layer3(model.layer2(model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(grey))))))))
            b = reference.layer4(reference.layer3(reference.layer2(reference.layer1(
                reference.maxpool(reference.relu(reference.bn1(reference.conv1(grey.repeat(1, 3, 1, 1)))))))))
        else:
            a, b = model.features(grey), reference.features(grey.repeat(1, 3, 1, 1))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_adapt_first_conv_rules():
    w = torch.randn(8, 3, 3, 3)
    assert torch.equal(pt.adapt_first_conv(w, 3), w)
    torch.testing.assert_close(pt.adapt_first_conv(w, 1), w.sum(1, keepdim=True))
    six = pt.adapt_first_conv(w, 6)
    torch.testing.assert_close(six, torch.cat([w, w], 1) * 0.5)
    # the response to a constant image is preserved when channels are repeated and rescaled
    torch.testing.assert_close(six.sum(1), w.sum(1))


def test_freeze_backbone_keeps_weights_and_bn_stats(tmp_path):
    from moderncnn.models.pretrained import freeze_backbone, keep_frozen_norms_in_eval
    model = create_model("resnet18", num_classes=4, in_chans=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    note = freeze_backbone(model)
    assert "classifier only (fc)" in note
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    model.train()
    keep_frozen_norms_in_eval(model)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 1, 32, 32)), torch.randint(0, 4, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    for key in before:
        if key.startswith("fc."):
            assert not torch.equal(before[key], after[key]), key
        else:
            assert torch.equal(before[key], after[key]), key  # weights and running statistics


def test_fine_tune_image_folder_end_to_end(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("test", 4)):
        for cls, color in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
            (tmp_path / "photos" / split / cls).mkdir(parents=True)
            for i in range(n):
                img = (np.array(color) + rng.integers(-20, 20, (40, 40, 3))).clip(0, 255).astype(np.uint8)
                Image.fromarray(img).save(tmp_path / "photos" / split / cls / f"{i}.jpg")
    weights = tmp_path / "imagenet-like.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    from moderncnn.cli import main
    code = main(["train", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "photos"), "--model", "resnet18",
                 "--pretrained", str(weights), "--freeze-backbone", "--epochs", "2", "--batch-size", "8",
                 "--image-size", "32", "--out", str(tmp_path / "runs"), "--name", "ft", "--no-progress"])
    assert code == 0
    report = (tmp_path / "runs" / "ft" / "report.md").read_text()
    assert "trained parameters | classifier only (fc): 1,026 trained" in report
    capsys.readouterr()
    img = tmp_path / "photos" / "test" / "blue" / "0.jpg"
    assert main(["predict", str(tmp_path / "runs" / "ft"), str(img), "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "blue" in out and "red" in out


@pytest.mark.parametrize("call", [
    lambda: create_model("resnet18", True),  # timm: pretrained is the second argument
    lambda: create_model("resnet18", weights="DEFAULT"),  # torchvision's word
    lambda: create_model("resnet18", weights="IMAGENET1K_V1"),
    lambda: create_model("resnet18", weights="ResNet18_Weights.IMAGENET1K_V1"),
    lambda: create_model("resnet18", weights=torchvision.models.ResNet18_Weights.DEFAULT),
])
def test_timm_and_torchvision_spellings_of_pretrained_weights(hub, server, monkeypatch, call):
    served, base = server
    reference = torchvision.models.resnet18().eval()
    filename = _publish(served, "resnet18", reference.state_dict())
    asked = []
    monkeypatch.setattr(pt, "weights_url", lambda name, tag="DEFAULT": asked.append(tag) or f"{base}/{filename}")
    model = call().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    assert asked[0] in ("DEFAULT", "IMAGENET1K_V1")


def test_unknown_weights_name_and_misplaced_arguments_are_one_line_errors():
    with pytest.raises(pt.PretrainedError, match=r"resnet50 has no torchvision weights 'IMAGENET9K_V9'.*IMAGENET1K_V2"):
        create_model("resnet50", weights="ResNet50_Weights.IMAGENET9K_V9")
    with pytest.raises(TypeError, match=r"second argument is pretrained \(timm's order\); pass num_classes=10"):
        create_model("resnet18", 10)
    with pytest.raises(TypeError, match="pretrained= or weights="):
        create_model("resnet18", True, weights="DEFAULT")


def test_list_models_takes_timms_filters():
    assert list_models("resnet1*") == ["resnet101", "resnet152", "resnet18", "resnet18_wrc"]
    assert list_models(filter=["vgg1?", "nin"]) == ["nin", "vgg11", "vgg13", "vgg16", "vgg19"]
    assert list_models("densenet*", exclude_filters="*_d2l") == [n for n in list_models("densenet*") if n != "densenet_d2l"]
    assert "densenet_d2l" in list_models("densenet*") and list_models("") == list_models()
    assert list_models("resnet*", exclude_filters=["*1", "*_*"], pretrained=True) == ["resnet152", "resnet18",
                                                                                       "resnet34", "resnet50"]
