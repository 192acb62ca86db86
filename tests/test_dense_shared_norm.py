"""The dense block's shared-statistics training path (models/dense_shared_norm.py) against the ordinary
path, torchvision's DenseNet, autocast, torch.compile and the cases where it must step aside."""
import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from moderncnn import create_model
from moderncnn.models import dense_shared_norm
from moderncnn.models.densenet import DenseBlock


def ordinary_copy(model: nn.Module) -> nn.Module:
    """The same network on torchvision's path: every layer concatenates and normalises its own input."""
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if isinstance(module, DenseBlock):
            module.shared_statistics = False
    return ref


@pytest.fixture
def shared_calls(monkeypatch):
    """Counts the blocks that ran the shared path."""
    calls = []
    original = dense_shared_norm.SharedNormDenseBlock.apply

    def counting(*args):
        calls.append(args[0])
        return original(*args)

    monkeypatch.setattr(dense_shared_norm.SharedNormDenseBlock, "apply", counting)
    return calls


def assert_grads_close(model, ref, rtol=1e-4):
    # Some gradients are zero up to rounding (biases just before a BatchNorm, the stem's scale): compare
    # them at the scale of the largest gradient.
    atol = 0.01 * rtol * max(q.grad.abs().max().item() for q in ref.parameters())
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=name)


# CSP DenseNets are checked in float64 below: the ordinary path's own fp32 rounding (e.g. in another memory
# layout) moves their stem's gradient by over 1%.
CASES = [("densenet121", 1, 96), ("densenet_bc_100", 3, 32), ("densenet40", 3, 32), ("densenet_d2l", 1, 64)]


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["normal", "memory_efficient"])
@pytest.mark.parametrize("name,in_chans,size", CASES, ids=[c[0] for c in CASES])
def test_shared_statistics_equal_the_ordinary_path(name, in_chans, size, memory_efficient, shared_calls):
    # fp32: one step, within rounding. (Over several steps, BatchNorm at a small batch amplifies fp32
    # rounding: torchvision's own path in two memory layouts drifts apart too; fp64 below checks steps.)
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=in_chans, memory_efficient=memory_efficient,
                         shared_statistics=True).train()
    ref = ordinary_copy(model).set_memory_efficient(False)
    x, y = torch.randn(8, in_chans, size, size), torch.randint(0, 10, (8,))
    out, expected = model(x), ref(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    F.cross_entropy(out, y).backward()
    F.cross_entropy(expected, y).backward()
    assert_grads_close(model, ref, rtol=1e-3)
    assert len(shared_calls) == sum(isinstance(m, DenseBlock) for m in model.modules())
    state, reference = model.state_dict(), ref.state_dict()
    assert list(state) == list(reference)
    for key in reference:   # running statistics and num_batches_tracked
        torch.testing.assert_close(state[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("memory_efficient", [False, True], ids=["normal", "memory_efficient"])
@pytest.mark.parametrize("cross_stage_partial", [None, 0.5], ids=["densenet_bc", "csp_densenet_bc"])
def test_shared_statistics_equal_the_ordinary_path_over_sgd_steps_in_float64(cross_stage_partial, memory_efficient):
    torch.manual_seed(0)
    model = create_model("densenet_bc_100", num_classes=10, memory_efficient=memory_efficient, block_config=(3, 4, 3),
                         cross_stage_partial=cross_stage_partial, shared_statistics=True).double().train()
    ref = ordinary_copy(model).set_memory_efficient(False)
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, ref)]
    for _ in range(3):
        outputs = []
        for net, optimizer in zip((model, ref), optimizers):
            optimizer.zero_grad()
            outputs.append(net(x))
            F.cross_entropy(outputs[-1], y).backward()
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-10)
        assert_grads_close(model, ref, rtol=1e-9)
        for optimizer in optimizers:
            optimizer.step()
    torch.testing.assert_close(model.state_dict(), ref.state_dict(), rtol=1e-10, atol=1e-10)


def test_shared_path_matches_torchvision_in_training(shared_calls):
    # In float64, so that the comparison is exact rather than a matter of fp32 rounding.
    torch.manual_seed(0)
    reference = torchvision.models.densenet121(num_classes=10).double().train()
    model = create_model("densenet121", num_classes=10, shared_statistics=True).double().train()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    out, expected = model(x), reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    out.square().mean().backward()
    expected.square().mean().backward()
    assert_grads_close(model, reference, rtol=1e-9)
    torch.testing.assert_close(model.state_dict(), reference.state_dict(), rtol=1e-10, atol=1e-10)
    assert len(shared_calls) == 4


def test_memory_efficient_runs_shared_under_bfloat16_autocast(shared_calls):
    # Correctness holds where bf16 is emulated too; the block keeps its buffers in bf16.
    torch.manual_seed(0)
    model = create_model("densenet_bc_100", num_classes=10, memory_efficient=True).train()
    ref = ordinary_copy(model).set_memory_efficient(False)
    x = torch.randn(8, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        expected = ref(x)
    assert out.dtype == torch.bfloat16 and len(shared_calls) == 3
    block_output = model.features.denseblock1(torch.randn(8, 24, 32, 32, dtype=torch.bfloat16))
    assert block_output.dtype == torch.bfloat16
    saved = [t for t in block_output.grad_fn.saved_tensors if t is not None]
    assert all(t.dtype in (torch.bfloat16, torch.float32) for t in saved)
    assert block_output.grad_fn.saved_tensors[1].dtype == torch.bfloat16   # the normalised-feature buffer
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.1, atol=0.1)
    out.float().square().mean().backward()
    expected.float().square().mean().backward()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    expected_grads = torch.cat([q.grad.flatten() for q in ref.parameters()])
    assert F.cosine_similarity(grads, expected_grads, dim=0) > 0.99


def test_torch_compile_trains_through_the_shared_path():
    torch.manual_seed(0)
    model = create_model("densenet_bc_100", num_classes=10, block_config=(2, 2, 2), memory_efficient=True).train()
    ref = ordinary_copy(model).set_memory_efficient(False)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(4, 3, 32, 32)
    out = compiled(x)
    out.sum().backward()
    expected = ref(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert_grads_close(model, ref, rtol=1e-3)


def test_dropout_steps_aside_to_the_ordinary_path(shared_calls):
    model = create_model("densenet_bc_100", num_classes=10, drop_rate=0.2, block_config=(2, 2, 2),
                         shared_statistics=True).train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert shared_calls == []


def test_sync_batchnorm_steps_aside(shared_calls):
    # SyncBatchNorm synchronises its statistics inside its own layers, so the block must run them.
    model = nn.SyncBatchNorm.convert_sync_batchnorm(create_model("densenet_bc_100", num_classes=10,
                                                                 block_config=(2, 2, 2), memory_efficient=True)).train()
    block = model.features.denseblock1
    assert isinstance(block.denselayer1.norm1, nn.SyncBatchNorm)
    assert not block._can_share_statistics(torch.randn(2, 24, 32, 32))
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert shared_calls == []


def test_evaluation_and_no_grad_paths_do_not_use_the_shared_path(shared_calls):
    model = create_model("densenet_bc_100", num_classes=10, block_config=(2, 2, 2), memory_efficient=True)
    with torch.no_grad():
        model.train()(torch.randn(2, 3, 32, 32))
    model.eval()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert shared_calls == []


def test_shared_statistics_follow_the_memory_mode_by_default(shared_calls):
    x = torch.randn(2, 3, 32, 32)
    create_model("densenet_bc_100", num_classes=10, block_config=(2, 2, 2)).train()(x).sum().backward()
    assert shared_calls == []   # the normal mode keeps torchvision's path unless asked
    create_model("densenet_bc_100", num_classes=10, block_config=(2, 2, 2),
                 memory_efficient=True).train()(x).sum().backward()
    assert len(shared_calls) == 3
