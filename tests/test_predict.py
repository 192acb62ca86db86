"""eval and predict on a trained run: the same accuracy, the same preprocessing as training."""
import numpy as np
import pytest
import torch
from PIL import Image

import moderncnn
from moderncnn.training import load_checkpoint


def test_eval_cli_prints_accuracy(trained_run, data_dir, capsys):
    from moderncnn.cli import main
    assert main(["eval", str(trained_run)]) == 0
    out = capsys.readouterr().out
    state = load_checkpoint(trained_run / "best.pt")
    assert f"test accuracy: {state['history'][-1]['test_acc']:.4f}" in out


def test_predict_on_png_files(trained_run, tmp_path, capsys):
    from moderncnn.cli import main
    from moderncnn.data import load_dataset
    state = load_checkpoint(trained_run / "best.pt")
    test = load_dataset("mnist", root=state["config"]["data_dir"], split="test")
    paths = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(test.images[i, 0].numpy()).convert("RGB").save(p)  # RGB file: converted to grey
        paths.append(str(p))
    assert main(["predict", str(trained_run), *paths, "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(str(tmp_path)) for line in lines)
    model = moderncnn.load_model(trained_run)
    from moderncnn.predict import predict_files
    top = predict_files(str(trained_run), paths, top_k=1)
    with torch.no_grad():
        x = (test.images[:3].float() / 255 - state["normalization"]["mean"][0]) / state["normalization"]["std"][0]
        expected = model(x).argmax(1)
    assert [t[1][0][0] for t in top] == [model.classes[i] for i in expected]


def test_predict_unreadable_image(trained_run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    from moderncnn.predict import predict_files
    with pytest.raises(ValueError, match="bad.png: unreadable image"):
        predict_files(str(trained_run), [str(bad)])


def test_predict_preprocesses_files_exactly_as_training(tmp_path):
    """Image folders are resized with PIL when read; predict must do the same, not a different resize."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (40, 44, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / cls / f"{i}.png")
    moderncnn.train(dataset="imagefolder", data_dir=str(tmp_path / "imgs"), image_size=32, model="resnet18",
                    model_kwargs={"small_input": True}, epochs=1, batch_size=4, out=str(tmp_path), name="r",
                    progress=False)
    from moderncnn.data import Loader, load_dataset
    from moderncnn.predict import predict_files
    state = load_checkpoint(tmp_path / "r" / "last.pt")
    test = load_dataset("imagefolder", root=str(tmp_path / "imgs"), split="test", image_size=32)
    loader = Loader(test, 64, train=False, image_size=32, mean=state["normalization"]["mean"],
                    std=state["normalization"]["std"])
    model = moderncnn.load_model(tmp_path / "r")
    with torch.no_grad():
        probs = model(next(iter(loader))[0]).softmax(1)
    files = sorted(str(p) for p in (tmp_path / "imgs" / "test").rglob("*.png"))
    top = predict_files(str(tmp_path / "r"), files, top_k=2)
    for i, (_, ranked) in enumerate(top):
        by_name = dict(ranked)
        for c, name in enumerate(model.classes):
            assert by_name[name] == pytest.approx(probs[i, c].item(), abs=1e-5)
