"""Files in the real dataset formats, generated for tests."""
import gzip
import signal
from pathlib import Path

import numpy as np

import moderncnn.data
from moderncnn.training import Callback

# The giants: exercised at their minimum size (or in slow tests) only, to keep the default run short.
HUGE = frozenset({"vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn", "alexnet",
                  "alexnet_d2l", "vgg_d2l", "resnet152", "resnet101", "densenet264", "densenet161", "densenet201"})


def write_idx(path: Path, array: np.ndarray, compress: bool = True, magic: int = None):
    """moderncnn's own writer, or, given a ``magic`` number, a deliberately wrong header."""
    if magic is None:
        return moderncnn.data.write_idx(path, array, compress)
    array = np.asarray(array, dtype=np.uint8)
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def make_mnist(root: Path, n_train=40, n_test=20, compress=True, labels_max=9, learnable=False, seed=0):
    """IDX files; with ``learnable`` each class is a bright square at its own place, so a model can
    actually learn them (for end-to-end tests that check accuracy moves)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sfx = ".gz" if compress else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, labels_max + 1, (n,))
        if learnable:
            images = rng.integers(0, 60, (n, 28, 28))
            for i, c in enumerate(labels):
                r, col = divmod(int(c), 4)
                images[i, 2 + r * 8: 8 + r * 8, 2 + col * 6: 7 + col * 6] = 250
        else:
            images = rng.integers(0, 256, (n, 28, 28))
        write_idx(root / f"{split}-images-idx3-ubyte{sfx}", images, compress)
        write_idx(root / f"{split}-labels-idx1-ubyte{sfx}", labels, compress)
    return root


def tiny(data_dir, out, **kw):
    """The options of a two-epoch run on the data of ``make_mnist(..., learnable=True)``."""
    base = dict(dataset="mnist", data_dir=str(data_dir), model="densenet_bc_fmnist", epochs=2, batch_size=64,
                out=str(out), name="run", progress=False, lr=0.2, seed=3, augment="none")
    base.update(kw)
    return base


class CtrlCAtStep(Callback):
    """Presses Ctrl-C during the n-th optimizer step of the run (1-based)."""

    def __init__(self, n):
        self.n, self.steps = n, 0

    def on_step_end(self, run, state, step):
        self.steps += 1
        if self.steps == self.n:
            signal.raise_signal(signal.SIGINT)
