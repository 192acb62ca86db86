import os

import pytest
import torch

from helpers import make_mnist, tiny

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_native_bf16(monkeypatch):
    """Every test sees a CPU without native bfloat16, as many CI machines are: ``--amp auto`` (the default) is
    then float32 everywhere. Tests of the precision decision set the capability they need."""
    from moderncnn import hardware
    monkeypatch.setattr(hardware, "cpu_bf16_feature", lambda: None)


@pytest.fixture(scope="module")
def data_dir(request, tmp_path_factory):
    """Learnable tiny MNIST files (see ``make_mnist``), made once per test module. A module that counts steps
    picks its own size with ``TINY_MNIST = (n_train, n_test)``."""
    n_train, n_test = getattr(request.module, "TINY_MNIST", (384, 128))
    return make_mnist(tmp_path_factory.mktemp("mnist"), n_train=n_train, n_test=n_test, learnable=True)


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    """The run directory of one epoch on ``data_dir``, with a validation split, so it has a best.pt."""
    import moderncnn
    out = tmp_path_factory.mktemp("trained")
    moderncnn.train(**tiny(data_dir, out, epochs=1, val_split=64))
    return out / "run"
