"""Readers on small files generated in the real formats, every corruption, and the loader."""
import gzip
import http.server
import os
import pickle
import threading
from functools import partial
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moderncnn.data import Augment, DatasetError, Loader, load_dataset, read_idx
from moderncnn.data.datasets import ImageDataset, search_paths

from helpers import make_mnist, write_idx

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No $MODERNCNN_DATA, a private cache, no Debian path."""
    monkeypatch.delenv("MODERNCNN_DATA", raising=False)
    monkeypatch.setenv("MODERNCNN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("moderncnn.data.datasets.DEBIAN_DATASETS", tmp_path / "no-debian")
    return tmp_path


# --- IDX -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_roundtrip(isolated, compress):
    root = make_mnist(isolated / "mnist", compress=compress)
    ds = load_dataset("mnist", root=str(root))
    assert ds.images.shape == (40, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.classes == [str(i) for i in range(10)]
    raw = gzip.decompress((root / "train-images-idx3-ubyte.gz").read_bytes()) if compress else \
        (root / "train-images-idx3-ubyte").read_bytes()
    assert torch.equal(ds.images.flatten(), torch.from_numpy(np.frombuffer(raw[16:], dtype=np.uint8).copy()))
    test = load_dataset("mnist", root=str(root), split="test")
    assert len(test) == 20


def test_torchvision_layout_is_found(isolated):
    (isolated / "data" / "FashionMNIST" / "raw").mkdir(parents=True)
    make_mnist(isolated / "data" / "FashionMNIST" / "raw")
    ds = load_dataset("fashion-mnist", root=str(isolated / "data"))
    assert len(ds) == 40 and ds.classes[0] == "T-shirt/top"


def test_env_var_location(isolated, monkeypatch):
    (isolated / "env" / "mnist").mkdir(parents=True)
    make_mnist(isolated / "env" / "mnist")
    monkeypatch.setenv("MODERNCNN_DATA", str(isolated / "env"))
    assert len(load_dataset("mnist")) == 40
    assert search_paths("mnist")[0] == isolated / "env" / "mnist"


def test_not_found_says_where_and_how(isolated):
    with pytest.raises(DatasetError, match=r"(?s)fashion-mnist not found; looked in:.*cache.*apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=str(isolated / "nowhere"))
    with pytest.raises(DatasetError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")


def test_truncated_gzip(isolated):
    root = make_mnist(isolated / "m")
    f = root / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-30])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz: truncated or corrupt gzip"):
        load_dataset("mnist", root=str(root))


def test_not_gzip(isolated):
    root = make_mnist(isolated / "m")
    (root / "train-labels-idx1-ubyte.gz").write_bytes(b"plain bytes, not gzip")
    with pytest.raises(DatasetError, match="train-labels-idx1-ubyte.gz: not a gzip file"):
        load_dataset("mnist", root=str(root))


def test_wrong_magic(isolated):
    root = make_mnist(isolated / "m")
    write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((40, 28, 28)), magic=0x00000801 + 0x100)
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz: wrong magic number 0x00000901; expected 0x00000803"):
        load_dataset("mnist", root=str(root))


def test_truncated_idx_payload(isolated):
    root = make_mnist(isolated / "m", compress=False)
    f = root / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="truncated or padded IDX data"):
        read_idx(f, 3)


def test_count_mismatch(isolated):
    root = make_mnist(isolated / "m")
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(39))
    with pytest.raises(DatasetError, match="40 images but .* has 39 labels"):
        load_dataset("mnist", root=str(root))


def test_label_out_of_range(isolated):
    root = make_mnist(isolated / "m")
    write_idx(root / "train-labels-idx1-ubyte.gz", np.full(40, 12))
    with pytest.raises(DatasetError, match="label 12 out of range"):
        load_dataset("mnist", root=str(root))


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_debian_fashion_mnist():
    ds = load_dataset("fashion-mnist", root=str(DEBIAN_FMNIST))
    assert ds.images.shape == (60000, 1, 28, 28) and ds.num_classes == 10
    assert torch.bincount(ds.labels).tolist() == [6000] * 10
    test = load_dataset("fashion-mnist", root=str(DEBIAN_FMNIST), split="test")
    assert test.images.shape == (10000, 1, 28, 28)


# --- CIFAR-10 -------------------------------------------------------------------------------------------------
def make_cifar_python(root: Path, n=12):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": b"x", b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"a.png"] * n}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in "abcdefghij"], b"num_vis": 3072}, f, protocol=2)
    return d


def make_cifar_binary(root: Path, n=12):
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], 1)
        (d / name).write_bytes(records.astype(np.uint8).tobytes())
    (d / "batches.meta.txt").write_text("\n".join("klmnopqrst") + "\n")
    return d


def test_cifar_python_batches(isolated):
    d = make_cifar_python(isolated / "c")
    ds = load_dataset("cifar10", root=str(isolated / "c"))
    assert ds.images.shape == (60, 3, 32, 32) and ds.classes == list("abcdefghij")
    with open(d / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="bytes")  # our own generated file: trusted here
    assert torch.equal(ds.images[0].flatten(), torch.from_numpy(first[b"data"][0]))
    assert ds.labels[:12].tolist() == first[b"labels"]
    assert len(load_dataset("cifar10", root=str(isolated / "c"), split="test")) == 12


def test_cifar_binary_batches(isolated):
    d = make_cifar_binary(isolated / "c")
    ds = load_dataset("cifar10", root=str(isolated / "c"))
    raw = np.frombuffer((d / "data_batch_1.bin").read_bytes(), dtype=np.uint8).reshape(-1, 3073)
    assert ds.labels[0].item() == raw[0, 0]
    assert torch.equal(ds.images[0].flatten(), torch.from_numpy(raw[0, 1:].copy()))
    assert ds.classes == list("klmnopqrst") and len(ds) == 60


def test_cifar_malicious_pickle_is_refused_not_run(isolated, tmp_path):
    d = make_cifar_python(isolated / "c")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(DatasetError, match=r"data_batch_1: not a CIFAR-10 python batch \(refusing to load"):
        load_dataset("cifar10", root=str(isolated / "c"))
    assert not marker.exists()


def test_cifar_truncated_files(isolated):
    d = make_cifar_binary(isolated / "b")
    f = d / "data_batch_3.bin"
    f.write_bytes(f.read_bytes()[:-7])
    with pytest.raises(DatasetError, match="data_batch_3.bin: truncated CIFAR-10 binary batch"):
        load_dataset("cifar10", root=str(isolated / "b"))
    d = make_cifar_python(isolated / "p")
    f = d / "data_batch_2"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(DatasetError, match="data_batch_2: truncated or corrupt"):
        load_dataset("cifar10", root=str(isolated / "p"))


# --- image folders -------------------------------------------------------------------------------------------
def make_folder(root: Path, classes=("cat", "dog"), n=3, size=(10, 12), mode="RGB", ext="png"):
    rng = np.random.default_rng(3)
    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size[0], size[1], 3) if mode == "RGB" else size
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / split / cls / f"{i}.{ext}")
    return root


def test_image_folder_reads_and_caches(isolated):
    root = make_folder(isolated / "imgs", ext="png")
    ds = load_dataset("imagefolder", root=str(root))
    assert ds.images.shape == (6, 3, 10, 12) and ds.classes == ["cat", "dog"]
    expected = np.asarray(Image.open(root / "train" / "cat" / "0.png")).transpose(2, 0, 1)
    assert torch.equal(ds.images[0], torch.from_numpy(expected.copy()))
    caches = [p for p in (isolated / "cache" / "imagefolder").iterdir() if (p / "meta.json").is_file()]
    assert len(caches) == 1
    again = load_dataset("imagefolder", root=str(root))
    assert torch.equal(again.images, ds.images)
    assert len(list((isolated / "cache" / "imagefolder").iterdir())) == 1  # served from the cache
    # Changing the folder invalidates the cache.
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "train" / "dog" / "new.png")
    assert len(load_dataset("imagefolder", root=str(root))) == 7


def test_image_folder_resize_gray_and_jpeg(isolated):
    root = make_folder(isolated / "g", mode="L", ext="jpg", size=(20, 20))
    ds = load_dataset("imagefolder", root=str(root), image_size=8)
    assert ds.images.shape == (6, 1, 8, 8)
    rgb = load_dataset("imagefolder", root=str(root), image_size=8, channels=3, split="test")
    assert rgb.images.shape == (6, 3, 8, 8)


def test_image_folder_val_fraction(isolated):
    root = make_folder(isolated / "v", n=5)
    import shutil
    shutil.rmtree(root / "test")
    train = load_dataset("imagefolder", root=str(root), val_fraction=0.2)
    test = load_dataset("imagefolder", root=str(root), split="test", val_fraction=0.2)
    assert len(train) == 8 and len(test) == 2
    assert not set(map(bytes, train.images.numpy())) & set(map(bytes, test.images.numpy()))


def test_image_folder_errors(isolated):
    root = make_folder(isolated / "e")
    (root / "train" / "cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable file: .*train/cat/1.png: unreadable image"):
        assert len(load_dataset("imagefolder", root=str(root))) == 5
    with pytest.raises(DatasetError, match=r"train/cat/1.png: unreadable image"):
        load_dataset("imagefolder", root=str(root), strict=True)
    root2 = make_folder(isolated / "e2")
    (root2 / "train" / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"train/empty: empty class folder"):
        load_dataset("imagefolder", root=str(root2))
    root3 = make_folder(isolated / "e3")
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(root3 / "train" / "cat" / "odd.png")
    with pytest.raises(DatasetError, match="different sizes"):
        load_dataset("imagefolder", root=str(root3))
    with pytest.raises(DatasetError, match="imagefolder not found"):
        load_dataset("imagefolder")


# --- download through torchvision, from a local HTTP server --------------------------------------------------
def test_download_uses_torchvision_with_checksums(isolated, monkeypatch):
    import hashlib
    import torchvision.datasets as tvd
    served = isolated / "served"
    served.mkdir()
    make_mnist(served)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = partial(Quiet, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        files = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"]
        md5 = {f: hashlib.md5((served / f).read_bytes()).hexdigest() for f in files}
        monkeypatch.setattr(tvd.MNIST, "mirrors", [f"http://127.0.0.1:{server.server_port}/"])
        monkeypatch.setattr(tvd.MNIST, "resources", [(f, md5[f]) for f in files])
        ds = load_dataset("mnist", download=True)
        assert len(ds) == 40
        assert (isolated / "cache" / "mnist" / "MNIST" / "raw").is_dir()
        # A checksum mismatch is an error, not a silently accepted file.
        monkeypatch.setattr(tvd.MNIST, "resources", [(f, "0" * 32) for f in files])
        monkeypatch.setenv("MODERNCNN_CACHE", str(isolated / "cache2"))
        with pytest.raises(DatasetError, match="downloading mnist into .* failed"):
            load_dataset("mnist", download=True)
        assert not list((isolated / "cache2" / "mnist").rglob("*.gz"))  # nothing corrupt is kept
    finally:
        server.shutdown()


# --- loader ----------------------------------------------------------------------------------------------------
def tiny_dataset(n=64, c=1, size=8, classes=4):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)
    return ImageDataset(images, torch.arange(n) % classes, [str(i) for i in range(classes)], "tiny")


def test_loader_yields_normalized_batches():
    ds = tiny_dataset()
    loader = Loader(ds, 16, train=False)
    assert len(loader) == 4
    xs, ys = zip(*loader)
    x = torch.cat(xs)
    assert x.dtype == torch.float32 and ys[0].dtype == torch.int64
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2
    assert torch.equal(torch.cat(ys), ds.labels)  # test order is the dataset order


def test_loader_len_drop_last():
    ds = tiny_dataset(n=50)
    assert len(Loader(ds, 16, train=True)) == 3
    assert len(Loader(ds, 16, train=False)) == 4
    assert sum(len(y) for _, y in Loader(ds, 16, train=False)) == 50


def test_loader_same_seed_same_batches_bit_for_bit():
    ds = tiny_dataset()
    a = [(x.clone(), y.clone()) for x, y in Loader(ds, 16, augment="crop+flip+erase", seed=5)]
    b = [(x.clone(), y.clone()) for x, y in Loader(ds, 16, augment="crop+flip+erase", seed=5)]
    c = [(x.clone(), y.clone()) for x, y in Loader(ds, 16, augment="crop+flip+erase", seed=6)]
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))


def test_loader_epochs_differ_and_iterate_replays():
    loader = Loader(tiny_dataset(), 16, seed=1)
    first = [y for _, y in loader]
    second = [y for _, y in loader]
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(torch.equal(a, b) for a, b in zip(second, [y for _, y in loader.iterate(1)]))


def test_shards_are_disjoint_and_equal():
    ds = tiny_dataset(n=67)
    shards = [Loader(ds, 4, rank=r, world_size=3, seed=2).indices(0) for r in range(3)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == 22
    flat = torch.cat(shards)
    assert len(set(flat.tolist())) == len(flat)


def test_crop_flip_gather_flip_rate_and_crop_offsets():
    from moderncnn.data.loader import crop_flip_gather
    g = torch.Generator().manual_seed(0)
    ramp = (torch.arange(8) + 1).to(torch.uint8).view(1, 1, 1, 8).expand(4000, 1, 8, 8).contiguous()
    index = torch.arange(4000)
    flipped = crop_flip_gather(ramp, index, g, padding=0, flip=True)
    rate = (flipped[:, 0, 0, 0] == 8).float().mean().item()
    assert 0.45 < rate < 0.55
    # Zero padding 2: the first column's value tells the horizontal offset (zeros: a shift to the right).
    cropped = crop_flip_gather(ramp, index, g, padding=2, flip=False, mode="zeros")
    first = cropped[:, 0, 4, :].long()
    offsets = torch.where(first[:, 0] == 0, -(first == 0).sum(1), first[:, 0] - 1)
    assert set(offsets.tolist()) == {-2, -1, 0, 1, 2}
    assert cropped.shape == ramp.shape


def test_erasing_and_resize():
    ds = tiny_dataset(n=32, size=28)
    loader = Loader(ds, 32, augment=Augment(crop_padding=0, flip=False, erasing=1.0), image_size=40)
    x, _ = next(iter(loader))
    assert x.shape == (32, 1, 40, 40)
    assert ((x == 0).flatten(1).sum(1) > 0).all()  # every image has an erased (mean-valued) patch
    plain = Loader(ds, 32, train=False, image_size=96)
    assert next(iter(plain))[0].shape == (32, 1, 96, 96)


def test_augment_spec_parsing():
    assert Augment.parse("crop+flip") == Augment(4, "reflect", True, 0.0)
    assert not Augment.parse("none").enabled
    with pytest.raises(ValueError, match="unknown augmentation rotate"):
        Augment.parse("crop+rotate")
    assert Augment.parse("crop2+altflip") == Augment(2, "reflect", True, 0.0, alternate_flip=True)
    with pytest.raises(ValueError, match="crop and crop2 exclude each other"):
        Augment.parse("crop+crop2")


def test_jpeg_reencoding_changes_half_the_batch_as_pillow_would():
    assert Augment.parse("crop2+altflip+jpeg").jpeg_quality == 50
    assert Augment.parse("jpeg30").jpeg_quality == 30 and Augment.parse("jpeg30").enabled
    with pytest.raises(ValueError, match="lowest quality from 1 to 95"):
        Augment.parse("jpeg99")
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (64, 3, 4, 4)), np.ones((1, 1, 8, 8))).astype(np.uint8)
    images = torch.from_numpy(smooth + rng.integers(0, 20, smooth.shape).astype(np.uint8))  # blocks and noise
    ds = ImageDataset(images, torch.zeros(64, dtype=torch.long), ["x"], "blocks")
    loader = Loader(ds, 64, augment="jpeg90", seed=0, mean=[0.0] * 3, std=[1 / 255] * 3)  # x == the bytes
    x = next(iter(loader.iterate(0)))[0].round().to(torch.uint8)
    order = loader.indices(0)
    changed = (x != images[order]).flatten(1).any(1)
    assert 16 < int(changed.sum()) < 48  # a random half
    # a re-encoded image is what Pillow makes of it at one of the qualities in [90, 95]
    i = int(changed.nonzero()[0])
    original = Image.fromarray(images[order[i]].permute(1, 2, 0).numpy())
    errors = []
    for quality in range(90, 96):
        buffer = BytesIO()
        original.save(buffer, "JPEG", quality=quality)
        pillow = torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1).float()
        errors.append((pillow - x[i].float()).abs().mean().item())
    assert min(errors) == 0.0 < max(errors), errors
    # resumable: the same epoch and seed give the same bytes
    assert torch.equal(next(iter(loader.iterate(0)))[0], next(iter(loader.iterate(0)))[0])


def test_crop_padding_from_the_spec_bounds_the_shift():
    """"crop2" pads by two pixels: a lone dot moves by -2..2 in each direction, every offset taken."""
    n, size, centre = 512, 16, 8
    images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    images[:, 0, centre, centre] = 255
    ds = ImageDataset(images, torch.zeros(n, dtype=torch.long), ["dot"], "dots")
    loader = Loader(ds, 128, augment="crop2", seed=0, mean=[0.0], std=[1.0])
    x = torch.cat([batch for batch, _ in loader.iterate(0)])
    where = x.flatten(1).argmax(1)
    dy, dx = where // size - centre, where % size - centre
    assert set(dy.tolist()) == set(dx.tolist()) == {-2, -1, 0, 1, 2}
    assert (x.flatten(1).amax(1) == 1).all()  # the dot (255, scaled to 1) never leaves the image


def test_alternating_flip_flips_each_image_every_other_epoch():
    assert Augment.parse("crop+altflip") == Augment(4, "reflect", True, 0.0, alternate_flip=True)
    with pytest.raises(ValueError, match="exclude each other"):
        Augment.parse("flip+altflip")
    # Each image is a ramp whose first pixel is its own index: a flipped image starts with its last pixel.
    n, size = 64, 8
    images = (torch.arange(n)[:, None] * 2 + torch.tensor([0] + [1] * (size - 1)))
    images = images.to(torch.uint8).view(n, 1, 1, size).expand(n, 1, size, size).contiguous()
    ds = ImageDataset(images, torch.arange(n), [str(i) for i in range(n)], "ramps")
    loader = Loader(ds, 16, augment="altflip", seed=3, mean=[0.0], std=[1 / 255])  # x == the bytes

    def flips(epoch):
        out = torch.empty(n, dtype=torch.bool)
        for x, y in loader.iterate(epoch):
            out[y] = x[:, 0, 0, 0] != (y * 2).float()  # not its own first pixel: mirrored
        return out

    first = flips(0)
    assert 0.3 < first.float().mean().item() < 0.7
    assert torch.equal(flips(1), ~first) and torch.equal(flips(2), first) and torch.equal(flips(5), ~first)
    again = Loader(ds, 16, augment="altflip", seed=3, mean=[0.0], std=[1 / 255])
    assert torch.equal(again.flipped_first, loader.flipped_first)  # fixed by the seed: every rank agrees


def test_fused_crop_flip_matches_pad_then_crop():
    """The gather-based crop+flip equals padding the image and cutting the window, for both modes."""
    from torch.nn import functional as F
    from moderncnn.data.loader import crop_flip_gather
    images = torch.randint(0, 256, (50, 2, 9, 7), dtype=torch.uint8)
    index = torch.arange(50).flip(0)
    for mode in ("reflect", "zeros"):
        g = torch.Generator().manual_seed(4)
        out = crop_flip_gather(images, index, g, padding=3, flip=True, mode=mode)
        g = torch.Generator().manual_seed(4)  # replay the same draws
        dy = torch.randint(0, 7, (50, 1), generator=g)
        dx = torch.randint(0, 7, (50, 1), generator=g)
        mirrored = torch.rand(50, 1, generator=g) < 0.5
        padded = F.pad(images[index].float(), (3, 3, 3, 3), mode="reflect" if mode == "reflect" else "constant")
        for i in range(50):
            window = padded[i, :, dy[i, 0]:dy[i, 0] + 9, dx[i, 0]:dx[i, 0] + 7]
            if mirrored[i, 0]:
                window = window.flip(-1)
            assert torch.equal(out[i].float(), window), (mode, i)


CIFAR10_JPG = Path(os.environ.get("MODERNCNN_CIFAR10_JPG",
                                  Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"))


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR10_JPG.is_file(), reason="the CIFAR-10 JPEG copy is not on this machine")
def test_cifar10_jpeg_copy_through_the_image_folder_reader(isolated):
    """The real CIFAR-10 JPEG class folders (opt-in: $MODERNCNN_CIFAR10_JPG or ../shared/data)."""
    import tarfile
    with tarfile.open(CIFAR10_JPG) as tar:
        tar.extractall(isolated / "cifar10-jpg", filter="data")
    root = str(isolated / "cifar10-jpg")
    train = load_dataset("imagefolder", root=root, split="train")
    test = load_dataset("imagefolder", root=root, split="test")
    assert train.images.shape == (50000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.classes[:3] == ["airplane", "automobile", "bird"]
    assert len(train.classes) == 10 and train.labels.bincount().tolist() == [5000] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
    # channel means of CIFAR-10's training set (0.491, 0.482, 0.447), give or take the JPEG re-encoding
    means = train.images.float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(means, torch.tensor([0.491, 0.482, 0.447]), atol=0.01)
    again = load_dataset("imagefolder", root=root, split="test")  # from the cache this time
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


@pytest.mark.parametrize("compress", [True, False])
def test_write_idx_round_trips_through_read_idx(tmp_path, compress):
    from moderncnn.data import write_idx
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.arange(5, dtype=np.uint8)
    write_idx(tmp_path / "images", images, compress=compress)
    write_idx(tmp_path / "labels", labels, compress=compress)
    assert (tmp_path / "images").read_bytes()[:2] == (b"\x1f\x8b" if compress else b"\x00\x00")
    assert torch.equal(read_idx(tmp_path / "images", 3), torch.from_numpy(images))
    assert torch.equal(read_idx(tmp_path / "labels", 1), torch.from_numpy(labels))
