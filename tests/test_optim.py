"""Optimizers: Muon for the conv filters (against SVD and torch's SGD), its wiring into training."""
import pytest
import torch
from torch import nn

import moderncnn
from moderncnn.training import TrainConfig, resolve_config
from moderncnn.training.optim import LRSchedule, Muon, build_optimizer, orthogonalize


@pytest.mark.parametrize("shape", [(16, 64, 3, 3), (64, 200, 1, 1), (300, 20), (8, 8)])
def test_orthogonalize_matches_the_polar_factor(shape):
    torch.manual_seed(0)
    g = torch.randn(shape)
    out = orthogonalize(g)
    assert out.shape == g.shape and out.dtype == g.dtype
    m = out.reshape(shape[0], -1)
    s = torch.linalg.svdvals(m)
    assert s.min() > 0.6 and s.max() < 1.25  # the quintic iteration's band, not exactly 1
    u, _, vh = torch.linalg.svd(g.reshape(shape[0], -1), full_matrices=False)
    polar = u @ vh  # the exact orthogonalization
    cosine = (m * polar).sum() / (m.norm() * polar.norm())
    assert cosine > 0.97


def test_orthogonalize_is_scale_free():
    g = torch.randn(32, 48)
    torch.testing.assert_close(orthogonalize(g), orthogonalize(1e-3 * g), atol=1e-4, rtol=1e-3)


def test_orthogonalize_a_list_in_one_batch_equals_one_by_one():
    torch.manual_seed(0)
    filters = [torch.randn(16, 8, 3, 3) for _ in range(3)]
    batched = orthogonalize(filters)
    assert isinstance(batched, list) and len(batched) == 3
    for b, f in zip(batched, filters):
        torch.testing.assert_close(b, orthogonalize(f), atol=1e-5, rtol=1e-4)


def test_orthogonalize_batches_different_widths_exactly():
    """DenseNet's bottleneck banks share their output count, not their input width: one zero-padded batch
    gives each the result of its own iteration, tall ones (more outputs than inputs) included."""
    torch.manual_seed(0)
    banks = [torch.randn(48, c, 1, 1) for c in (24, 36, 48, 120, 204)] + [torch.randn(48, 16, 3, 3)]
    batched = orthogonalize(banks)
    for b, f in zip(batched, banks):
        assert b.shape == f.shape
        torch.testing.assert_close(b, orthogonalize(f), atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="one row count"):
        orthogonalize([torch.randn(8, 4), torch.randn(6, 4)])


def test_muon_steps_banks_of_one_output_width_as_if_alone():
    """Convolutions with the same outputs and different inputs, stepped together (in batches of similar
    widths), move exactly as each does in an optimizer of its own (tall ones scaled too)."""
    from moderncnn.training.optim import _width_batches
    torch.manual_seed(3)
    weights = [torch.randn(32, 2, 1, 1), torch.randn(32, 3, 1, 1), torch.randn(32, 40, 1, 1), torch.randn(32, 64, 1, 1),
               torch.randn(32, 16, 3, 3)]
    widths = [[p.shape[1] * p.shape[2] * p.shape[3] for p, _ in b] for b in _width_batches([(w, None) for w in weights])]
    assert widths == [[2, 3], [40, 64], [144]]
    grads = [torch.randn_like(w) for w in weights]
    together = [w.clone().requires_grad_() for w in weights]
    opt = Muon([{"params": together, "muon": True}], lr=0.1, momentum=0.9, weight_decay=0.01)
    for p, g in zip(together, grads):
        p.grad = g.clone()
    opt.step()
    for w, g, t in zip(weights, grads, together):
        alone = w.clone().requires_grad_()
        alone.grad = g.clone()
        Muon([{"params": [alone], "muon": True}], lr=0.1, momentum=0.9, weight_decay=0.01).step()
        torch.testing.assert_close(t, alone, atol=2e-6, rtol=1e-5)


def _net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def _loss(net):
    torch.manual_seed(2)
    x, y = torch.randn(16, 3, 6, 6), torch.randint(0, 5, (16,))
    return nn.functional.cross_entropy(net(x), y)


def test_muon_steps_the_other_parameters_exactly_like_sgd_nesterov():
    net, ref = _net(), _net()
    opt = build_optimizer(net, "muon", lr=0.1, weight_decay=5e-4, momentum=0.9, muon_lr=0.02)
    ref_opt = build_optimizer(ref, "sgd", lr=0.1, weight_decay=5e-4, momentum=0.9)
    for _ in range(3):
        for model, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            _loss(model).backward()
            o.step()
        with torch.no_grad():  # same filters in both, so that every other gradient is the same too
            ref[0].weight.copy_(net[0].weight)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert [g["muon"] for g in opt.param_groups if any(q is net[0].weight for q in g["params"])] == [True]


def test_muon_filter_update_is_orthogonal_with_decoupled_weight_decay():
    net = _net()
    opt = build_optimizer(net, "muon", lr=0.1, weight_decay=0.01, momentum=0.9, muon_lr=0.05)
    filters = [g for g in opt.param_groups if g["muon"]]
    assert [p for g in filters for p in g["params"]] == [net[0].weight]
    assert all(g["lr"] == 0.05 for g in filters)
    w0 = net[0].weight.detach().clone()
    _loss(net).backward()
    grad = net[0].weight.grad.clone()
    opt.step()
    # first step: momentum buffer = grad, Nesterov update = grad + 0.9 * grad
    step = (w0 * (1 - 0.05 * 0.01) - net[0].weight.detach()) / 0.05
    rows, cols = 8, 3 * 3 * 3
    assert rows < cols  # wide: no shape scaling
    s = torch.linalg.svdvals(step.reshape(rows, cols))
    assert s.min() > 0.6 and s.max() < 1.25
    u, _, vh = torch.linalg.svd((1.9 * grad).reshape(rows, cols), full_matrices=False)
    cosine = (step.reshape(rows, cols) * (u @ vh)).sum() / (step.norm() * (u @ vh).norm())
    assert cosine > 0.97


def test_muon_scales_tall_filter_banks():
    conv = nn.Conv2d(2, 32, 1, bias=False)  # 32 x 2: tall
    opt = Muon([{"params": [conv.weight], "muon": True}], lr=0.1, momentum=0.0)
    w0 = conv.weight.detach().clone()
    conv.weight.grad = torch.randn_like(conv.weight)
    opt.step()
    step = (w0 - conv.weight.detach()).reshape(32, 2) / 0.1
    s = torch.linalg.svdvals(step)
    assert s.min() > 0.6 * 4 and s.max() < 1.25 * 4  # sqrt(32 / 2) = 4


def test_muon_schedule_and_state_dict_round_trip():
    net = _net()
    opt = build_optimizer(net, "muon", lr=0.1, weight_decay=5e-4, momentum=0.9, muon_lr=0.02)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule("cosine", total_steps=10))
    for _ in range(4):
        opt.zero_grad()
        _loss(net).backward()
        opt.step()
        sched.step()
    factor = sched.lr_lambdas[0](4)
    lrs = {g["muon"]: g["lr"] for g in opt.param_groups}
    assert lrs[True] == pytest.approx(0.02 * factor) and lrs[False] == pytest.approx(0.1 * factor)
    clone = _net()
    opt2 = build_optimizer(clone, "muon", lr=0.1, weight_decay=5e-4, momentum=0.9, muon_lr=0.02)
    opt2.load_state_dict(opt.state_dict())
    buffers = [opt2.state[p]["momentum_buffer"] for p in clone.parameters()]
    assert all(torch.equal(a, opt.state[p]["momentum_buffer"]) for a, p in zip(buffers, net.parameters()))


def test_muon_config_defaults_and_errors():
    cfg = resolve_config(TrainConfig(optimizer="muon"))
    assert cfg.muon_lr == 0.05 and cfg.lr == 0.2  # the fast recipe's SGD rate for the other parameters
    assert resolve_config(TrainConfig(optimizer="muon", muon_lr=0.1)).muon_lr == 0.1
    with pytest.raises(ValueError, match="sgd, adamw, adam or muon"):
        resolve_config(TrainConfig(optimizer="lion"))
    with pytest.raises(ValueError, match="momentum"):
        Muon(_net().parameters(), lr=0.1, momentum=1.0)


def test_training_with_muon_learns_and_resumes(tmp_path):
    from helpers import make_mnist
    data = make_mnist(tmp_path / "mnist", n_train=384, n_test=128, learnable=True)
    common = dict(dataset="mnist", data_dir=str(data), model="densenet_bc_fmnist", batch_size=64, out=str(tmp_path),
                  progress=False, seed=3, augment="none", optimizer="muon", lr=0.2, muon_lr=0.05)
    result = moderncnn.train(epochs=1, name="muon", **common)
    assert result.final_acc > 0.5  # 10 classes: chance is 0.1
    report = (tmp_path / "muon" / "report.md").read_text()
    assert "muon lr 0.05 momentum 0.9 (conv filters) + sgd lr 0.2 momentum 0.9 (the rest)" in report
    resumed = moderncnn.train(epochs=2, name="muon", resume=str(tmp_path / "muon"), **common)
    assert resumed.config.optimizer == "muon" and len(resumed.history) == 2


def test_weight_decay_skips_norms_and_biases():
    from moderncnn.training.optim import param_groups
    model = moderncnn.create_model("resnet18_wrc", num_classes=3, in_chans=1)
    groups = param_groups(model, 0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim > 1), name
