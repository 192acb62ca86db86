"""Image folders: parallel decoding into a cache, memory or memory-mapped, resizing without distortion, and
bad files skipped and named."""
import csv
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import moderncnn
from moderncnn.cli import main
from moderncnn.data import DatasetError, Loader, load_dataset
from moderncnn.data.folder import decode_image, resize_image


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MODERNCNN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_folder(root, classes=("cat", "dog"), n=4, size=(12, 12), splits=("train", "test"), seed=0):
    rng = np.random.default_rng(seed)
    for split in splits:
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def _png_header_only(path, width, height):
    """A PNG whose header declares ``width`` x ``height`` pixels (and holds none)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))


# --- resizing ------------------------------------------------------------------------------------------------
def test_crop_keeps_the_centre_squash_stretches_and_pad_letterboxes():
    wide = np.zeros((10, 20, 3), np.uint8)
    wide[:, 5:15] = 255  # a white square in the middle of a 2:1 image
    img = Image.fromarray(wide)
    crop = np.asarray(resize_image(img, (10, 10), "crop"))
    assert crop.shape == (10, 10, 3) and crop.min() == 255  # the centre only: all white
    squash = np.asarray(resize_image(img, (10, 10), "squash"))
    assert squash[:, 0].max() == 0 and squash[:, 5].min() == 255  # the sides kept, squeezed
    pad = np.asarray(resize_image(img, (10, 10), "pad"))
    assert pad[:2].max() == 0 and pad[-2:].max() == 0 and pad[5, 5].min() == 255  # black bars above and below


def test_a_folder_of_photos_is_centre_cropped_by_default(tmp_path, cache):
    root = make_folder(tmp_path / "p", size=(30, 40))
    crop = load_dataset("imagefolder", root=str(root), image_size=16)
    squash = load_dataset("imagefolder", root=str(root), image_size=16, resize="squash")
    first = Image.open(sorted((root / "train" / "cat").iterdir())[0])
    expected = np.asarray(first.resize((21, 16), Image.BILINEAR).crop((2, 0, 18, 16))).transpose(2, 0, 1)
    assert torch.equal(crop.images[0], torch.from_numpy(expected.copy()))
    assert not torch.equal(crop.images, squash.images)


# --- the cache: parallel, atomic, memory or disk --------------------------------------------------------------
def test_parallel_decoding_equals_serial_and_the_cache_is_npy(tmp_path, cache):
    root = make_folder(tmp_path / "f", n=300, size=(8, 8))
    one = load_dataset("imagefolder", root=str(root), workers=1, cache_root=str(tmp_path / "one"))
    two = load_dataset("imagefolder", root=str(root), workers=2, cache_root=str(tmp_path / "two"))
    assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels) and len(one) == 600
    entries = list((tmp_path / "two" / "imagefolder").iterdir())
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} == {"images.npy", "labels.npy", "meta.json"}
    assert np.load(entries[0] / "images.npy", mmap_mode="r").shape == (600, 3, 8, 8)


def test_disk_mode_maps_the_cache_and_gives_the_same_batches(tmp_path, cache):
    root = make_folder(tmp_path / "f", n=20)
    memory = load_dataset("imagefolder", root=str(root), cache="memory")
    disk = load_dataset("imagefolder", root=str(root), cache="disk")
    assert (memory.storage, disk.storage) == ("memory", "disk")
    assert isinstance(disk.mapped, np.memmap) and isinstance(memory.images, torch.Tensor)
    for augment in ("crop+flip", "crop+altflip+erase"):
        a = list(Loader(memory, 8, augment=augment, seed=3).iterate(1))
        b = list(Loader(disk, 8, augment=augment, seed=3).iterate(1))
        assert all(torch.equal(x, y) and torch.equal(la, lb) for (x, la), (y, lb) in zip(a, b))
    disk.release_pages()  # drops resident pages; the data stays readable
    assert torch.equal(disk.images, memory.images)


@pytest.mark.slow
def test_a_run_gives_the_same_metrics_from_memory_and_from_disk(tmp_path, cache):
    root = make_folder(tmp_path / "f", n=16, size=(32, 32))
    for mode in ("memory", "disk"):
        moderncnn.train(dataset="imagefolder", data_dir=str(root), model="resnet18", model_kwargs={"small_input": True},
                        epochs=2, batch_size=8, out=str(tmp_path), name=mode, progress=False, data_cache=mode,
                        augment="crop+flip", seed=4)
    rows = {m: list(csv.DictReader(open(tmp_path / m / "metrics.csv"))) for m in ("memory", "disk")}
    timing = ("seconds", "images_per_second")
    for a, b in zip(rows["memory"], rows["disk"]):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}
    assert "memory-mapped from the disk cache" in (tmp_path / "disk" / "report.md").read_text()


def test_an_old_in_memory_cache_file_is_ignored_and_rebuilt(tmp_path, cache):
    root = make_folder(tmp_path / "f")
    (cache / "imagefolder").mkdir(parents=True)
    torch.save({"images": torch.zeros(1, 3, 2, 2, dtype=torch.uint8)}, cache / "imagefolder" / "0123abcd.pt")
    assert load_dataset("imagefolder", root=str(root)).images.shape == (8, 3, 12, 12)


# --- bad files ------------------------------------------------------------------------------------------------
def test_unreadable_files_are_skipped_and_named(tmp_path, cache):
    root = make_folder(tmp_path / "b")
    bad = root / "train" / "cat"
    (bad / "truncated.png").write_bytes((bad / "0.png").read_bytes()[:60])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.png").write_text("not an image")
    _png_header_only(bad / "bomb.png", 60000, 60000)
    with pytest.warns(UserWarning, match=r"skipped 4 unreadable files") as caught:
        ds = load_dataset("imagefolder", root=str(root))
    message = str(caught[0].message)
    for name in ("truncated.png", "empty.jpg", "notes.png", "bomb.png"):
        assert name in message
    assert len(ds) == 8 and len(ds.skipped) == 4
    with pytest.raises(DatasetError, match=r"bomb.png: unreadable image .*strict data"):
        load_dataset("imagefolder", root=str(root), strict=True, cache_root=str(tmp_path / "strict"))


def test_a_run_reports_its_skipped_files(tmp_path, cache):
    from moderncnn.cli import _warning_line
    root = make_folder(tmp_path / "b", size=(32, 32))
    (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    with pytest.warns(UserWarning, match="broken.jpg"):
        code = main(["train", "--dataset", "imagefolder", "--data-dir", str(root), "--model", "resnet18",
                     "--model-arg", "small_input=True", "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path),
                     "--name", "r", "--no-progress"])
    assert code == 0
    import moderncnn.data.folder
    assert _warning_line("a file was skipped", UserWarning, moderncnn.data.folder.__file__, 1) == (
        "moderncnn: warning: a file was skipped\n")
    assert "1 unreadable file skipped" in (tmp_path / "r" / "report.md").read_text()


def test_grey_rgba_palette_and_16_bit_images_are_converted(tmp_path):
    grey16 = tmp_path / "g16.png"
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(grey16)
    assert decode_image(grey16, 1, None).max() == 255  # the top of the 16-bit range is white, not clipped noise
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (4, 4), (10, 20, 30, 0)).save(rgba)
    assert decode_image(rgba, 3, None)[:, 0, 0].tolist() == [10, 20, 30]
    palette = tmp_path / "p.gif"
    Image.new("P", (4, 4), 0).save(palette)
    assert decode_image(palette, 3, (2, 2)).shape == (3, 2, 2)
    assert decode_image(rgba, 1, (3, 3)).shape == (1, 3, 3)


@pytest.mark.parametrize("case,message", [
    ("one class", "one class folder (cat); a classifier needs at least 2 classes"),
    ("all bad", "no readable image left in this class folder"),
    ("extra test class", "class folder 'bird' is not among the training classes (cat, dog)"),
])
def test_folders_that_cannot_make_a_classifier_are_one_line_errors(tmp_path, cache, capsys, case, message):
    classes = ("cat",) if case == "one class" else ("cat", "dog")
    root = make_folder(tmp_path / "x", classes=classes)
    if case == "all bad":
        for f in (root / "train" / "dog").iterdir():
            f.write_bytes(b"junk")
    if case == "extra test class":
        make_folder(root, classes=("bird",), splits=("test",))
    assert main(["train", "--dataset", "imagefolder", "--data-dir", str(root), "--out", str(tmp_path / "runs"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "".join(err)


# --- random-resized-crop for fine-tuning ------------------------------------------------------------------------
def test_random_resized_crop_covers_its_scale_and_evaluation_cuts_the_centre():
    from moderncnn.data.loader import Augment, center_crop, random_resized_crop
    assert Augment.parse("rrc+flip").rrc and Augment.parse("rrc+flip").flip
    with pytest.raises(ValueError, match="exclude each other"):
        Augment.parse("crop+rrc")
    ramp = torch.arange(64.).view(1, 1, 1, 64).expand(500, 1, 64, 64).contiguous()
    g = torch.Generator().manual_seed(0)
    out = random_resized_crop(ramp, (16, 16), g, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    widths = out[:, 0, 8, -1] - out[:, 0, 8, 0]  # a 32-pixel-wide box sampled at 16 points: ~30 apart
    assert out.shape == (500, 1, 16, 16) and torch.allclose(widths, torch.full_like(widths, 30.0), atol=1.5)
    assert out[:, 0, 8, 0].min() >= 0 and out[:, 0, 8, -1].max() <= 63  # inside the image
    assert torch.equal(center_crop(ramp[:1], (2, 4))[0, 0, 0], torch.tensor([30., 31., 32., 33.]))


def test_fine_tuning_stores_larger_images_crops_randomly_and_predicts_on_the_centre(tmp_path, cache):
    from moderncnn.predict import predict_files
    from moderncnn.runs import load_run
    root = make_folder(tmp_path / "f", size=(40, 48))
    weights = tmp_path / "w.pth"
    torch.save(moderncnn.create_model("resnet18", num_classes=3).state_dict(), weights)
    result = moderncnn.train(dataset="imagefolder", data_dir=str(root), model="resnet18", pretrained=str(weights),
                             image_size=32, epochs=1, batch_size=4, out=str(tmp_path), name="ft", progress=False)
    assert result.config.augment == "rrc+flip"  # the default when fine-tuning
    spec = load_run(tmp_path / "ft").info.spec
    assert spec.native_size == [37, 37] and spec.image_size == 32 and spec.eval_crop
    model = moderncnn.load_model(tmp_path / "ft")
    test = load_dataset("imagefolder", root=str(root), split="test", image_size=37)
    loader = Loader(test, 64, train=False, image_size=32, mean=spec.mean, std=spec.std, eval_crop=True)
    with torch.no_grad():
        probs = model(next(iter(loader))[0]).softmax(1)
    files = sorted(str(p) for p in (root / "test").rglob("*.png"))
    for i, (_, ranked) in enumerate(predict_files(str(tmp_path / "ft"), files, top_k=2)):
        for name, p in ranked:
            assert p == pytest.approx(probs[i, model.classes.index(name)].item(), abs=1e-5)
