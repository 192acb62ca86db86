"""Checkpoints: safe loading (weights only), one-line errors for damaged files, atomic writes."""
import os

import pytest
import torch

import moderncnn
from moderncnn.checkpoint import save_checkpoint
from moderncnn.runs import load_model_state
from moderncnn.training import CheckpointError, load_checkpoint


def test_corrupt_truncated_and_malicious_checkpoints(trained_run, tmp_path):
    good = (trained_run / "best.pt").read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt checkpoint"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Payload()}, evil)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_of_another_architecture(trained_run):
    state = load_checkpoint(trained_run / "best.pt")
    other = moderncnn.create_model("resnet18", num_classes=10, in_chans=1)
    with pytest.raises(CheckpointError, match=r"trained with model 'densenet_bc_fmnist'.*does not fit 'resnet18'"):
        load_model_state(other, state)


def test_atomic_save_leaves_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind
