"""ONNX and TorchScript export: every registered model, equal to PyTorch; export + predict of a run."""
import json

import numpy as np
import pytest
import torch

import moderncnn
from moderncnn import create_model, list_models
from moderncnn.export import export, export_model

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

HUGE = {"vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "alexnet",
        "alexnet_d2l", "vgg_d2l", "resnet152", "resnet101", "densenet264", "densenet161", "densenet201", "nin"}


def _calibrated(name, size, **kwargs):
    """A model whose BatchNorm statistics were set by two training-mode passes: random-init deep nets
    in eval mode otherwise blow activations up to ~1e4, where float32 itself has no 1e-4 to spare."""
    model = create_model(name, num_classes=10, in_chans=1, **kwargs)
    c = model.min_input_size[0]
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, c, size, size))
    return model.eval()


def _check_onnx(name, tmp_path, default_size=False):
    with torch.device("meta"):
        probe = create_model(name, num_classes=10, in_chans=1)
    c, h, w = probe.default_input_size if default_size else probe.min_input_size
    size = h if default_size else max(h, 32)
    model = _calibrated(name, size)
    path = export_model(model, tmp_path / f"{name}.onnx", "onnx", (c, size, size))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, c, size, size)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["in_chans"] == 1 and meta["image_size"] == size
    del session
    path.unlink()  # VGG at 224 is ~0.5 GB: a session of them must not fill a small /tmp


@pytest.mark.parametrize("name", [n for n in list_models() if n not in HUGE])
def test_onnx_export_matches_pytorch(name, tmp_path):
    _check_onnx(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HUGE))
def test_onnx_export_matches_pytorch_large_models(name, tmp_path):
    # At their ImageNet size: ONNX cannot express an adaptive pool that upsamples (AlexNet/VGG at 32x32).
    _check_onnx(name, tmp_path, default_size=True)


def test_failed_export_keeps_the_previous_file(tmp_path, monkeypatch):
    """A write that fails midway (full disk, Ctrl-C) leaves the earlier export whole and no partial file."""
    import moderncnn.export as export_module
    model = create_model("resnet_d2l", num_classes=10, in_chans=1)
    path = export_model(model, tmp_path / "m.onnx", "onnx", (1, 32, 32))
    before = path.read_bytes()

    def disk_full(model, example, target, opset):
        target.write_bytes(b"\x08\x08half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "_export_onnx", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_model(model, path, "onnx", (1, 32, 32))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.onnx"]


@pytest.mark.parametrize("name", ["densenet121", "resnet18_wrc", "googlenet", "cspresnet50"])
def test_torchscript_roundtrip(name, tmp_path):
    model = create_model(name, num_classes=5, in_chans=3).eval()
    path = export_model(model, tmp_path / "m.pt", "torchscript", (3, 64, 64))
    loaded = torch.jit.load(str(path))
    for batch in (1, 4):
        x = torch.randn(batch, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-4)


def test_export_run_and_predict_with_onnx(tmp_path, capsys):
    from PIL import Image
    from helpers import make_mnist
    from moderncnn.cli import main
    from moderncnn.predict import predict_files
    data = make_mnist(tmp_path / "data", n_train=128, n_test=64, learnable=True)
    moderncnn.train(dataset="mnist", data_dir=str(data), epochs=1, batch_size=64, out=str(tmp_path), name="r",
                    progress=False, augment="none")
    run = tmp_path / "r"
    assert main(["export", str(run), "--format", "onnx"]) == 0
    assert (run / "model.onnx").is_file() and (run / "model.json").is_file()
    meta = json.loads((run / "model.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)] and len(meta["mean"]) == 1
    images = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (28, 28), dtype=np.uint8)).save(p)
        images.append(str(p))
    from_onnx = predict_files(str(run / "model.onnx"), images, top_k=3)
    from_ckpt = predict_files(str(run), images, top_k=3)
    for (_, a), (_, b) in zip(from_onnx, from_ckpt):
        assert [n for n, _ in a] == [n for n, _ in b]
        np.testing.assert_allclose([p for _, p in a], [p for _, p in b], atol=1e-4)
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    assert (run / "model.pt").is_file()
    with pytest.raises(ValueError, match="would overwrite a checkpoint"):
        export(str(run), "torchscript", output=str(run / "best.pt"))
