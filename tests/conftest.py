import os

import pytest
import torch

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
