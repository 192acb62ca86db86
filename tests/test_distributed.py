"""torchrun with 2 CPU processes (gloo): one run directory, and the same weights as one process."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from moderncnn.training import load_checkpoint

from helpers import make_mnist

# NiN has no BatchNorm (per-rank batch statistics would differ from the global batch's on the CPU, where
# SyncBatchNorm does not run); dropout off and no augmentation make both runs deterministic.
COMMON = ["--model", "nin", "--model-arg", "small_input=True", "--model-arg", "dropout=0.0", "--dataset", "mnist",
          "--epochs", "2", "--batch-size", "32", "--lr", "0.02", "--augment", "none", "--label-smoothing", "0",
          "--no-progress", "--seed", "1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_gloo_equals_single_process(tmp_path):
    data = make_mnist(tmp_path / "data", n_train=128, n_test=64, learnable=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "moderncnn", "train", *COMMON, "--data-dir", str(data),
                             "--out", str(tmp_path), "--name", "single"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                          "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "moderncnn", "train",
                          *COMMON, "--data-dir", str(data), "--out", str(tmp_path), "--name", "ddp"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("training nin") == 1  # only rank 0 speaks
    assert ddp.stdout.count("done: final test accuracy") == 1
    files = sorted(p.name for p in (tmp_path / "ddp").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "single").iterdir())
    assert not [f for f in files if f.endswith(".tmp")]
    a = load_checkpoint(tmp_path / "single" / "last.pt")
    b = load_checkpoint(tmp_path / "ddp" / "last.pt")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-4, atol=1e-5, msg=key)
    assert b["history"][-1]["test_acc"] == pytest.approx(a["history"][-1]["test_acc"], abs=1 / 64 + 1e-9)


def test_sync_bn_on_cpu_is_refused(tmp_path):
    data = make_mnist(tmp_path / "data", n_train=64, n_test=32)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "moderncnn", "train",
                          "--dataset", "mnist", "--data-dir", str(data), "--epochs", "1", "--batch-size", "16",
                          "--sync-bn", "--out", str(tmp_path), "--no-progress"],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode != 0
    assert "--sync-bn needs CUDA" in run.stderr


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_processes_share_one_image_folder_cache(tmp_path):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / cls / f"{i}.png")
    env = dict(os.environ, OMP_NUM_THREADS="1", MODERNCNN_CACHE=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                          "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "moderncnn", "train",
                          "--dataset", "imagefolder", "--data-dir", str(tmp_path / "imgs"), "--image-size", "16",
                          "--model", "nin", "--model-arg", "small_input=True", "--epochs", "1", "--batch-size", "8",
                          "--data-cache", "disk", "--out", str(tmp_path), "--name", "ddp", "--no-progress"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    entries = sorted(p.name for p in (tmp_path / "cache" / "imagefolder").iterdir())
    assert len(entries) == 2 and not any(name.startswith(".building") for name in entries)  # train and test, once
    assert "memory-mapped from the disk cache" in run.stdout


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")
def test_two_process_gloo_trains_through_the_shared_statistics_path(tmp_path):
    # DDP's gradient hooks fire for the parameters the shared-statistics block passes through its autograd
    # function: the same 2-process run on torchvision's path ends with the same weights.
    data = make_mnist(tmp_path / "data", n_train=128, n_test=64, learnable=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["--model", "densenet_bc_fmnist", "--model-arg", "block_config=(2,2)", "--dataset", "mnist",
              "--epochs", "1", "--batch-size", "32", "--lr", "0.02", "--augment", "none", "--no-progress",
              "--seed", "1", "--data-dir", str(data), "--out", str(tmp_path)]
    for name, extra in (("shared", ["--memory-efficient"]), ("ordinary", ["--model-arg", "shared_statistics=False"])):
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
                              "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "moderncnn",
                              "train", *common, *extra, "--name", name], capture_output=True, text=True, env=env,
                             timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    a = load_checkpoint(tmp_path / "shared" / "last.pt")
    b = load_checkpoint(tmp_path / "ordinary" / "last.pt")
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-3, atol=1e-4, msg=key)
