"""Export: torch.export (.pt2) and ONNX (dynamo) for every registered model, equal to PyTorch; safetensors into
torchvision's models; AOTInductor; TorchScript; export + predict of a run in every format."""
import json
import logging

import numpy as np
import pytest
import torch

import moderncnn
from moderncnn import create_model, list_models
from moderncnn.export import FORMATS, export, export_model, load_exported, meta_path

from helpers import HUGE

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

# NiN joins the giants here: its exports are checked at its ImageNet size only.
LARGE = HUGE | {"nin"}


def _calibrated(name, size, num_classes=10, in_chans=1, **kwargs):
    """A model whose BatchNorm statistics were set by two training-mode passes: random-init deep nets
    in eval mode otherwise blow activations up to ~1e4, where float32 itself has no 1e-4 to spare."""
    model = create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    c = model.min_input_size[0]
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, c, size, size))
    return model.eval()


def _check_export(name, tmp_path, fmt, default_size=False, onnx_exporter="dynamo"):
    with torch.device("meta"):
        probe = create_model(name, num_classes=10, in_chans=1)
    c, h, w = probe.default_input_size if default_size else probe.min_input_size
    size = h if default_size else max(h, 32)
    model = _calibrated(name, size)
    path = export_model(model, tmp_path / f"{name}{FORMATS[fmt]}", fmt, (c, size, size), onnx_exporter=onnx_exporter)
    if fmt == "onnx":
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda x: session.run(None, {"images": x.numpy()})[0]  # noqa: E731
    else:
        loaded = load_exported(path)
        run = lambda x: loaded(x).numpy()  # noqa: E731
    for batch in (1, 3):
        x = torch.randn(batch, c, size, size)
        with torch.no_grad():
            expected = model(x).numpy()
            got = run(x)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    meta = json.loads(meta_path(path).read_text())
    assert meta["in_chans"] == 1 and meta["image_size"] == size and meta["format"] == fmt
    if fmt == "onnx":
        from moderncnn.export import _has_dynamo_exporter
        used = onnx_exporter if _has_dynamo_exporter() else "legacy"  # torch without the dynamo exporter
        assert meta["opset"] == 18 and meta["onnx_exporter"] == used
        del session
    path.unlink()  # VGG at 224 is ~0.5 GB: a session of them must not fill a small /tmp


# Representatives of the families for the default suite; the dynamo ONNX exporter takes ~10 s a model, and
# torch.export several seconds for the deeper DenseNets. The slow tests cover every other model.
ONNX_FAST = ["densenet_bc_fmnist", "resnet18", "googlenet_d2l", "cspresnet50"]
PT2_FAST = ONNX_FAST + ["densenet121", "resnet_d2l", "vgg_airbench", "densenet_d2l"]


@pytest.mark.parametrize("name", PT2_FAST)
def test_pt2_export_matches_pytorch(name, tmp_path):
    _check_export(name, tmp_path, "pt2")


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in list_models() if n not in LARGE and n not in PT2_FAST])
def test_pt2_export_matches_pytorch_every_model(name, tmp_path):
    _check_export(name, tmp_path, "pt2")


@pytest.mark.parametrize("name", ONNX_FAST)
def test_onnx_export_matches_pytorch(name, tmp_path):
    _check_export(name, tmp_path, "onnx")


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in list_models() if n not in LARGE and n not in ONNX_FAST])
def test_onnx_export_matches_pytorch_every_model(name, tmp_path):
    _check_export(name, tmp_path, "onnx")


def test_legacy_onnx_exporter_on_request(tmp_path):
    _check_export("resnet_d2l", tmp_path, "onnx", onnx_exporter="legacy")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LARGE))
def test_export_matches_pytorch_large_models(name, tmp_path):
    # At their ImageNet size: ONNX cannot express an adaptive pool that upsamples (AlexNet/VGG at 32x32).
    _check_export(name, tmp_path, "onnx", default_size=True)
    _check_export(name, tmp_path, "pt2", default_size=True)


@pytest.mark.parametrize("name, tv_name", [("densenet121", "densenet121"), ("resnet50", "resnet50")])
def test_safetensors_load_into_torchvision_with_equal_logits(name, tv_name, tmp_path):
    import torchvision
    from safetensors.torch import load_file
    model = _calibrated(name, 64, num_classes=7, in_chans=3)
    path = export_model(model, tmp_path / "m.safetensors", "safetensors", (3, 64, 64),
                        meta={"model_name": name, "num_classes": 7})
    theirs = getattr(torchvision.models, tv_name)(num_classes=7).eval()
    theirs.load_state_dict(load_file(str(path)), strict=True)
    ours = moderncnn.load_model(path)
    again = create_model(name, num_classes=7, in_chans=3, pretrained=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        for other in (theirs, ours, again):
            torch.testing.assert_close(other(x), expected, rtol=1e-5, atol=1e-5)


def test_failed_export_keeps_the_previous_file(tmp_path, monkeypatch):
    """A write that fails midway (full disk, Ctrl-C) leaves the earlier export whole and no partial file."""
    import moderncnn.export as export_module
    model = create_model("resnet_d2l", num_classes=10, in_chans=1)
    path = export_model(model, tmp_path / "m.onnx", "onnx", (1, 32, 32))
    before = path.read_bytes()

    def disk_full(model, example, target, opset, exporter):
        target.write_bytes(b"\x08\x08half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(export_module._WRITERS, "onnx", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_model(model, path, "onnx", (1, 32, 32))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]


@pytest.mark.parametrize("name", ["densenet121", "resnet18_wrc", "googlenet", "cspresnet50"])
def test_torchscript_roundtrip(name, tmp_path, caplog):
    model = create_model(name, num_classes=5, in_chans=3).eval()
    with caplog.at_level(logging.WARNING, logger="moderncnn"):
        path = export_model(model, tmp_path / "m.torchscript.pt", "torchscript", (3, 64, 64))
    assert [r.getMessage() for r in caplog.records if r.name == "moderncnn.export"] == [
        "TorchScript is deprecated in torch; --format pt2 (torch.export) replaces it"]
    loaded = load_exported(path)
    for batch in (1, 4):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)


def test_export_run_and_predict_in_every_format(tmp_path, capsys):
    from PIL import Image
    from helpers import make_mnist
    from moderncnn.cli import main
    from moderncnn.predict import predict_files
    data = make_mnist(tmp_path / "data", n_train=128, n_test=64, learnable=True)
    moderncnn.train(dataset="mnist", data_dir=str(data), epochs=1, batch_size=64, out=str(tmp_path), name="r",
                    progress=False, augment="none")
    run = tmp_path / "r"
    images = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (28, 28), dtype=np.uint8)).save(p)
        images.append(str(p))
    from_ckpt = predict_files(str(run), images, top_k=3)
    from moderncnn.predict import evaluate_checkpoint
    reference = evaluate_checkpoint(str(run))
    for fmt in ("onnx", "pt2", "safetensors", "torchscript"):
        capsys.readouterr()
        assert main(["export", str(run), "--format", fmt]) == 0
        deprecation = "moderncnn: warning: TorchScript is deprecated in torch; --format pt2 (torch.export) replaces it"
        assert (deprecation in capsys.readouterr().err) == (fmt == "torchscript")
        path = run / f"model{FORMATS[fmt]}"
        meta = json.loads(meta_path(path).read_text())
        assert meta["classes"] == [str(i) for i in range(10)] and len(meta["mean"]) == 1
        assert meta["model_name"] == "densenet_bc_fmnist" and meta["num_classes"] == 10
        for (_, a), (_, b) in zip(predict_files(str(path), images, top_k=3), from_ckpt):
            assert [n for n, _ in a] == [n for n, _ in b], fmt
            np.testing.assert_allclose([p for _, p in a], [p for _, p in b], atol=1e-4)
        assert main(["predict", str(path), images[0]]) == 0
        scored = evaluate_checkpoint(str(path))
        assert scored.images == 64 and scored.accuracy == pytest.approx(reference.accuracy, abs=1 / 64 + 1e-9)
        assert scored.loss == pytest.approx(reference.loss, abs=1e-3)
    with pytest.raises(ValueError, match="would overwrite a checkpoint"):
        export(str(run), "torchscript", output=str(run / "last.pt"))


@pytest.mark.slow
def test_aoti_package_predicts_like_pytorch(tmp_path):
    import shutil
    if not (shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")):
        pytest.skip("AOTInductor needs a C++ compiler and none is installed")
    model = _calibrated("densenet_bc_fmnist", 28)
    path = export_model(model, tmp_path / "m.aoti.pt2", "aoti", (1, 28, 28))
    loaded = load_exported(path)
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)


def test_aoti_without_a_compiler_is_one_line(tmp_path, monkeypatch):
    import shutil
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    model = create_model("resnet_d2l", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler .* and none was found"):
        export_model(model, tmp_path / "m.aoti.pt2", "aoti", (1, 32, 32))
    assert list(tmp_path.iterdir()) == []


def test_predict_on_a_file_of_an_unknown_kind_says_what_it_takes(tmp_path):
    from moderncnn.predict import predict_paths
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    with pytest.raises(ValueError, match="notes.txt: not a model moderncnn reads; expected a run directory"):
        predict_paths(str(notes), [str(notes)])


def test_a_model_torch_export_cannot_capture_is_one_line_and_writes_nothing(tmp_path):
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x[x > 0].sum().view(1, 1).expand(x.shape[0], 2) if x.sum().item() > 0 else x[:, :2, 0, 0]

    with pytest.raises(RuntimeError, match="DataDependent: torch.export cannot capture it: "):
        export_model(DataDependent(), tmp_path / "m.pt2", "pt2", (1, 4, 4))
    assert list(tmp_path.iterdir()) == []
