"""One parametrized set of tests over every registered model (timm's pattern), then the specifics:
torchvision equivalence, parameter counts, WRC, CSP, DenseNet modes."""
import shutil

import pytest
import torch
import torchvision
from torch import nn

import moderncnn
from moderncnn import create_model, list_models
from moderncnn.models import InputTooSmallError, UnknownModelError
from moderncnn.models.layers import min_input_size

from helpers import HUGE

ALL_MODELS = list_models()
EXPECTED_NAMES = """alexnet alexnet_d2l vgg11 vgg13 vgg16 vgg19 vgg11_bn vgg13_bn vgg16_bn vgg19_bn vgg_d2l
nin googlenet googlenet_d2l resnet18 resnet34 resnet50 resnet101 resnet152 resnet_d2l resnet18_wrc
cspresnet50 cspdensenet121 densenet_d2l densenet40 densenet_bc_100 densenet121 densenet161 densenet169
densenet201 densenet264""".split()


def test_registry_has_every_named_model():
    assert set(EXPECTED_NAMES) <= set(ALL_MODELS)
    # the default training model and the networks of the cifar10 and cifar10-speedrun recipes
    assert set(ALL_MODELS) - set(EXPECTED_NAMES) == {"densenet_bc_fmnist", "densenet_bc_cifar", "vgg_airbench"}


def test_list_models_pattern():
    assert list_models("resnet1*") == ["resnet101", "resnet152", "resnet18", "resnet18_wrc"]
    assert list_models("nothing*") == []


def test_create_model_keeps_each_models_own_defaults():
    fmnist = create_model("densenet_bc_fmnist")
    assert (fmnist.num_classes, fmnist.in_chans, fmnist.default_input_size) == (10, 1, (1, 28, 28))
    imagenet = create_model("densenet121")
    assert (imagenet.num_classes, imagenet.in_chans, imagenet.default_input_size) == (1000, 3, (3, 224, 224))
    assert create_model("resnet_d2l").default_input_size == (1, 96, 96)
    assert create_model("densenet_bc_100").num_classes == 10
    explicit = create_model("densenet_bc_fmnist", num_classes=5, in_chans=3)
    assert (explicit.num_classes, explicit.in_chans) == (5, 3)


def test_unknown_model_lists_closest_names():
    with pytest.raises(UnknownModelError, match="densenet121") as err:
        create_model("densenet12")
    assert isinstance(err.value, ValueError)
    with pytest.raises(UnknownModelError, match="unknown model 'zzz'"):
        create_model("zzz")


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_backward_min_size(name):
    """At the minimum input size: right output shape, finite gradients for every parameter."""
    model = create_model(name, num_classes=7, in_chans=2)
    c, h, w = model.min_input_size
    assert c == 2 and model.num_classes == 7 and model.in_chans == 2
    assert model.model_name == name
    model.train()
    x = torch.randn(2, c, h, w)
    out = model(x)
    logits = _logits(out)
    assert logits.shape == (2, 7)
    loss = sum(o.sum() for o in out) if isinstance(out, tuple) else logits.sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "some parameters got no gradient"
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_model_contract(name):
    """timm's contract on every model: features then head is the forward pass; the classifier, the first
    convolution and the head are named; reset_classifier changes the classes; loss() gives the logits."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=2).eval()
    c, h, w = model.min_input_size
    x = torch.randn(2, c, h, w)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.dim() == 4 and features.shape[0] == 2
        torch.testing.assert_close(model.forward_head(features), model(x))
    first = model.get_submodule(model.first_conv)
    assert isinstance(first, nn.Conv2d) and first.in_channels == 2
    assert first is next(m for m in model.modules() if isinstance(m, nn.Conv2d))  # really the first
    classifier = model.get_classifier()
    assert model.get_submodule(model.classifier_name) is classifier
    assert all(isinstance(model.get_submodule(h), nn.Module) for h in model.head_names)
    assert any(model.classifier_name == h or model.classifier_name.startswith(h + ".") for h in model.head_names)
    model.reset_classifier(4)
    assert model.num_classes == 4 and model.get_classifier() is not classifier
    with torch.no_grad():
        assert model(x).shape == (2, 4)
    model.train()
    target = torch.randint(0, 4, (2,))
    logits, loss = model.loss(model(x), target, nn.CrossEntropyLoss())
    assert logits.shape == (2, 4) and loss.dim() == 0 and torch.isfinite(loss)


def test_googlenet_loss_adds_its_auxiliary_heads():
    torch.manual_seed(0)
    model = create_model("googlenet", num_classes=5, in_chans=3).train()
    assert model.head_names == ("fc", "aux1", "aux2")
    outputs = model(torch.randn(2, 3, 224, 224))
    target = torch.tensor([1, 3])
    criterion = nn.CrossEntropyLoss()
    logits, loss = model.loss(outputs, target, criterion)
    expected = criterion(outputs[0], target) + 0.3 * (criterion(outputs[1], target) + criterion(outputs[2], target))
    assert logits is outputs[0]
    torch.testing.assert_close(loss, expected)
    model.reset_classifier(2)
    assert model.aux1.fc2.out_features == 2 and model.aux2.fc2.out_features == 2
    assert create_model("googlenet", aux_logits=False).head_names == ("fc",)


@pytest.mark.parametrize("name", [n for n in ALL_MODELS if n not in HUGE])
def test_forward_default_size(name):
    model = create_model(name, num_classes=5, in_chans=1).eval()
    c, h, w = model.default_input_size
    assert (c, h, w) >= model.min_input_size
    with torch.no_grad():
        out = model(torch.randn(1, c, h, w))
    assert out.shape == (1, 5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_too_small_input_names_model_and_minimum(name):
    model = create_model(name, num_classes=3, in_chans=1).eval()
    side = model.min_input_size[1]
    with pytest.raises(InputTooSmallError, match=rf"{name} needs inputs of at least {side}x{side}"):
        model(torch.randn(1, 1, side - 1, side))


def test_wrong_channel_count_is_reported():
    model = create_model("resnet18", num_classes=3, in_chans=1)
    with pytest.raises(ValueError, match="1-channel"):
        model(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "googlenet", "vgg11", "alexnet", "nin", "cspresnet50"])
def test_small_input_switch(name):
    model = create_model(name, num_classes=10, in_chans=1, small_input=True).eval()
    assert model.min_input_size[1] <= 28
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_min_input_size_matches_pytorch_arithmetic():
    # conv 7/2 pad 3 then ceil-mode pool 3/2: PyTorch gives 1 output pixel for inputs down to 1 and 3.
    assert min_input_size([(3, 2, 0, False)]) == 3
    assert min_input_size([(2, 2, 0, False)] * 5) == 32
    assert min_input_size([(11, 4, 2, False), (3, 2, 0, False), (3, 2, 0, False), (3, 2, 0, False)]) == 63
    pool = nn.MaxPool2d(3, 2, ceil_mode=True)
    for size in range(3, 20):  # our ceil-mode arithmetic equals PyTorch's
        ours = min_input_size([(3, 2, 0, True)] + [(1, 1, 0, False)])
        assert ours == 3
        assert pool(torch.zeros(1, 1, size, size)).shape[-1] >= 1


# --- torchvision equivalence -------------------------------------------------------------------------
TV_SAME = ["alexnet", "vgg11", "vgg11_bn", "vgg16", "googlenet", "resnet18", "resnet34", "resnet50",
           "densenet121", "densenet161", "densenet169", "densenet201"]


@pytest.mark.parametrize("name", TV_SAME)
def test_torchvision_state_dict_loads_and_gives_same_logits(name):
    kwargs = {"init_weights": True} if name == "googlenet" else {}
    theirs = getattr(torchvision.models, name)(num_classes=10, **kwargs).eval()
    ours = create_model(name, num_classes=10, in_chans=3).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    size = 64 if name not in ("alexnet",) else 224
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_torchvision_keys_and_shapes_equal_for_all_same_networks():
    for name in ["vgg13", "vgg13_bn", "vgg16_bn", "vgg19", "vgg19_bn", "resnet101", "resnet152"]:
        theirs = getattr(torchvision.models, name)(num_classes=10).state_dict()
        ours = create_model(name, num_classes=10).state_dict()
        assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}, name


def test_googlenet_keeps_torchvision_options():
    theirs = torchvision.models.googlenet(num_classes=10, aux_logits=True, transform_input=True, init_weights=True)
    ours = create_model("googlenet", num_classes=10, aux_logits=True, transform_input=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 96, 96)
    torch.manual_seed(1)
    theirs.train()
    ours.train()
    torch.manual_seed(3)
    a = theirs(x)
    torch.manual_seed(3)
    b = ours(x)
    assert len(a) == len(b) == 3
    for ta, tb in zip(a, b):
        torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-5)
    no_aux = create_model("googlenet", num_classes=10, aux_logits=False)
    assert not any(k.startswith("aux") for k in no_aux.state_dict())
    assert no_aux.train()(x).shape == (2, 10)


@pytest.mark.parametrize("name,count", [
    ("densenet121", 7_978_856), ("resnet18", 11_689_512), ("resnet50", 25_557_032),
    ("densenet169", 14_149_480), ("alexnet", 61_100_840), ("googlenet", 13_004_888),
])
def test_parameter_counts_equal_torchvision(name, count):
    assert sum(p.numel() for p in create_model(name).parameters()) == count


def test_cifar_densenets_have_paper_sizes():
    bc = create_model("densenet_bc_100", num_classes=10)
    assert 0.75e6 < sum(p.numel() for p in bc.parameters()) < 0.82e6  # paper: 0.8M
    d40 = create_model("densenet40", num_classes=10)
    assert 0.95e6 < sum(p.numel() for p in d40.parameters()) < 1.1e6  # paper: 1.0M
    assert bc.min_input_size[1] <= 8 and bc.default_input_size[1:] == (32, 32)
    n_layers = sum(1 for m in bc.modules() if type(m).__name__ == "DenseLayer")
    assert n_layers == 48


def test_densenet_stem_pool_halves_resolution_after_a_full_resolution_conv():
    model = create_model("densenet_bc_fmnist", num_classes=10, in_chans=3, stem_stride=1, stem_pool=True).eval()
    names = [name for name, _ in model.features.named_children()][:5]
    assert names == ["conv0", "norm0", "relu0", "pool0", "denseblock1"]
    assert model.features.conv0.stride == (1, 1)
    seen = {}
    model.features.denseblock1.register_forward_hook(lambda m, i, o: seen.update(block1=o.shape))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert seen["block1"][-2:] == (16, 16)
    assert model.min_input_size[1] == 8  # conv s1, pool 2, two transition pools
    with pytest.raises(InputTooSmallError):
        model(torch.randn(1, 3, 7, 7))


def test_densenet_stem_width_adds_a_full_resolution_conv_before_the_stem_conv():
    model = create_model("densenet_bc_cifar", num_classes=10, stem_width=24).eval()
    names = [name for name, _ in model.features.named_children()][:7]
    assert names == ["conv0a", "norm0a", "relu0a", "conv0", "norm0", "relu0", "pool0"]
    assert (model.features.conv0a.in_channels, model.features.conv0a.out_channels) == (3, 24)
    assert (model.features.conv0.in_channels, model.features.conv0.out_channels) == (24, 32)
    plain = create_model("densenet_bc_cifar", num_classes=10)
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 3 * 24 * 9 + 2 * 24 + (24 - 3) * 32 * 9  # conv0a, norm0a, a wider conv0
    shapes = {}
    model.features.conv0.register_forward_hook(lambda m, i, o: shapes.update(conv0=o.shape))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert shapes["conv0"][-2:] == (32, 32)  # both stem convs see every pixel
    assert model.min_input_size[1] == 8
    with pytest.raises(ValueError, match="small_input"):
        create_model("densenet121", stem_width=32)  # the ImageNet stem has no place for it


def test_densenet_variant_shape_is_overridable():
    model = create_model("densenet_bc_fmnist", num_classes=10, growth_rate=8, block_config=(2, 2),
                         num_init_features=12)
    blocks = [m for name, m in model.features.named_children() if name.startswith("denseblock")]
    assert [len(b) for b in blocks] == [2, 2]
    assert model.features.conv0.out_channels == 12
    assert blocks[0].denselayer1.conv2.out_channels == 8
    # 12 + 2*8 = 28 -> transition 14 -> 14 + 2*8 = 30 features
    assert model.num_features == 30 and model.classifier.in_features == 30


@pytest.mark.parametrize("csp", [None, 0.5])
def test_densenet_growth_rate_per_block(csp):
    model = create_model("densenet_bc_fmnist", num_classes=10, growth_rate=(4, 8), block_config=(2, 3),
                         num_init_features=12, bn_size=2, cross_stage_partial=csp)
    layers = [m for m in model.modules() if type(m).__name__ == "DenseLayer"]
    assert [layer.conv2.out_channels for layer in layers] == [4, 4, 8, 8, 8]
    assert [layer.conv1.out_channels for layer in layers] == [8, 8, 16, 16, 16]  # bottleneck bn_size * k
    if csp is None:  # 12 + 2*4 = 20 -> transition 10 -> 10 + 3*8 = 34 features
        assert model.num_features == 34
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    same = create_model("densenet_bc_fmnist", num_classes=10, growth_rate=(16, 16, 16))
    assert same.state_dict().keys() == create_model("densenet_bc_fmnist", num_classes=10).state_dict().keys()
    assert [p.shape for p in same.parameters()] == \
        [p.shape for p in create_model("densenet_bc_fmnist", num_classes=10).parameters()]
    for bad in [(4,), (4, 8, 16), (4, 0), (4, 2.5)]:
        with pytest.raises(ValueError, match="one per block"):
            create_model("densenet_bc_fmnist", num_classes=10, growth_rate=bad, block_config=(2, 3))


def test_densenet_bc_cifar_shape():
    model = create_model("densenet_bc_cifar", num_classes=10)
    blocks = [m for name, m in model.features.named_children() if name.startswith("denseblock")]
    assert [len(b) for b in blocks] == [4, 8, 16]
    assert model.features.conv0.in_channels == 3 and model.features.conv0.stride == (1, 1)
    assert isinstance(model.features.pool0, nn.MaxPool2d)
    assert 560e3 < sum(p.numel() for p in model.parameters()) < 590e3


def test_densenet264_block_config():
    m = create_model("densenet264")
    blocks = [len(getattr(m.features, f"denseblock{i}")) for i in range(1, 5)]
    assert blocks == [6, 12, 64, 48]


def test_d2l_networks_follow_the_book():
    vgg = create_model("vgg_d2l", num_classes=10, in_chans=1)
    widths = [m.out_channels for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [16, 32, 64, 64, 128, 128, 128, 128]
    assert create_model("vgg_d2l", num_classes=10, in_chans=1, ratio=8).features[0].out_channels == 8
    dn = create_model("densenet_d2l", num_classes=10, in_chans=1)
    assert dn.num_features == 248  # 64 -> 192 -> 96 -> 224 -> 112 -> 240 -> 120 -> 248
    alex = create_model("alexnet_d2l", num_classes=10, in_chans=1)
    assert alex.classifier[0].in_features == 6400
    assert alex.features(torch.zeros(1, 1, 224, 224)).shape == (1, 256, 5, 5)
    g = create_model("googlenet_d2l", num_classes=10, in_chans=1)
    assert g.inception3a.branch3[1].conv.kernel_size == (5, 5)


# --- WRC and CSP -------------------------------------------------------------------------------------
def test_wrc_block_output_is_weighted_sum():
    from moderncnn.models.resnet import BasicBlock
    block = BasicBlock(8, 8, weighted=True).eval()
    assert block.alpha.item() == 1.0 and block.beta.item() == 1.0
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        block.alpha.fill_(0.25)
        block.beta.fill_(-2.0)
        branch = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x)))))
        expected = torch.relu(0.25 * branch - 2.0 * x)
        torch.testing.assert_close(block(x), expected)


def test_wrc_weights_learn():
    model = create_model("resnet18_wrc", num_classes=3, in_chans=1)
    alphas = [m.alpha for m in model.modules() if hasattr(m, "alpha")]
    assert len(alphas) == 8
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    assert all(a.grad is not None and a.grad.abs().item() > 0 for a in alphas)


def test_csp_stage_bypass_does_not_touch_blocks():
    from moderncnn.models.layers import CSPStage
    blocks = nn.Conv2d(4, 4, 3, padding=1)
    stage = CSPStage(4, blocks, nn.Identity())
    x = torch.randn(1, 10, 5, 5)
    out = stage(x)
    assert out.shape == (1, 10, 5, 5)
    torch.testing.assert_close(out[:, 4:], x[:, 4:])  # the bypass half is untouched
    torch.testing.assert_close(out[:, :4], blocks(x[:, :4]))


def test_csp_models_split_their_stages():
    from moderncnn.models.layers import CSPStage
    for name in ("cspresnet50", "cspdensenet121"):
        stages = [m for m in create_model(name).modules() if isinstance(m, CSPStage)]
        assert len(stages) == 4, name


# --- DenseNet memory-efficient mode ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["densenet_bc_100", "densenet121", "densenet_d2l"])
def test_memory_efficient_same_outputs_and_gradients(name):
    torch.manual_seed(0)
    normal = create_model(name, num_classes=10, in_chans=1)
    efficient = create_model(name, num_classes=10, in_chans=1, memory_efficient=True)
    efficient.load_state_dict(normal.state_dict())
    x = torch.randn(4, 1, 32, 32)
    outs = []
    for model in (normal, efficient):
        model.train()
        out = model(x)
        out.square().mean().backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for key, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][key], rtol=1e-5, atol=1e-5, msg=key)
    torch.testing.assert_close(dict(normal.state_dict()), dict(efficient.state_dict()))  # same BN stats


def test_package_exports():
    assert moderncnn.create_model is create_model
    assert callable(moderncnn.summary)


# --- optimize_for_inference -------------------------------------------------------------------------
def _with_batch_statistics(name, in_chans=1):
    """A model in eval mode whose BatchNorms hold non-trivial statistics (so that folding them is really tested),
    and an input of its size."""
    model = create_model(name, num_classes=10, in_chans=in_chans)
    model.train()
    c, h, w = model.min_input_size
    size = max(h, 32)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, c, size, size))
    return model.eval(), torch.randn(3, c, size, size)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_optimize_for_inference_equals_model(name):
    from moderncnn.models.inference import optimize_for_inference
    model, x = _with_batch_statistics(name)
    trainable = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        expected = model(x)
    fast = optimize_for_inference(model)  # the tests' CPU has no native bfloat16: auto is float32
    assert fast.precision == "off"
    torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4)
    assert model.training is False and [p.requires_grad for p in model.parameters()] == trainable  # untouched


@pytest.mark.parametrize("name", ["densenet_bc_fmnist", "resnet18", "vgg11_bn", "googlenet", "nin", "alexnet"])
def test_optimize_for_inference_in_bfloat16_keeps_the_logits(name):
    from moderncnn.models.inference import optimize_for_inference
    model, x = _with_batch_statistics(name)
    with torch.no_grad():
        expected = model(x)
    fast = optimize_for_inference(model, precision="bf16")
    out = fast(x)
    assert fast.precision == "bf16" and next(fast.parameters()).dtype == torch.bfloat16
    assert out.dtype == torch.float32
    assert (out - expected).abs().max() <= 0.1 * expected.abs().max()  # bfloat16 keeps 8 bits of mantissa


def test_optimize_for_inference_auto_takes_bfloat16_where_the_cpu_has_it(monkeypatch):
    from moderncnn import hardware
    from moderncnn.models.inference import optimize_for_inference
    monkeypatch.setattr(hardware, "cpu_bf16_feature", lambda: "AMX")
    assert optimize_for_inference(create_model("nin", num_classes=10, in_chans=1)).precision == "bf16"
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp16, off"):
        optimize_for_inference(create_model("nin", num_classes=10, in_chans=1), precision="float32")


@pytest.mark.slow  # an Inductor compile: ~30 s on 2 cores
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None, reason="no C++ compiler")
def test_optimize_for_inference_compiled_equals_model_at_every_batch_size():
    from moderncnn.models.inference import optimize_for_inference
    model, x = _with_batch_statistics("resnet_d2l")
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(FutureWarning, match=r"jit=True\) is deprecated.*compile=True"):
        fast = optimize_for_inference(model, example=x[:2], jit=True)
    torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-4)  # another batch size than the example's


def test_densenet_no_grad_buffer_path_equals_concat_path():
    model = create_model("densenet_bc_100", num_classes=10, in_chans=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fast = model(x)
    with torch.enable_grad():
        slow = model(x)
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-5, atol=1e-5)


def test_densenet_no_grad_path_stays_bfloat16_under_autocast():
    # Evaluation under bf16 autocast: the block buffer and the eval BN-ReLU stay bf16 (fp32 BN statistics
    # promoted every layer's input to an fp32 copy before), and the result matches the grad path's.
    from moderncnn.models.densenet import _eval_norm_relu
    torch.manual_seed(0)
    model = create_model("densenet_bc_cifar", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            fast = model(x)
        slow = model(x)
    assert _eval_norm_relu(model.features.denseblock1.denselayer1.norm1,
                           torch.randn(2, 32, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), slow.detach().float(), rtol=0.05, atol=0.05)


def test_memory_efficient_densenet_under_autocast_trains():
    # Memory-efficient training under bf16 autocast (the shared-statistics block runs in bf16; it failed
    # with a dtype mismatch in cuDNN/oneDNN when the layers called fp32 kernels themselves).
    torch.manual_seed(0)
    model = create_model("densenet_bc_100", num_classes=10, memory_efficient=True).train()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert out.shape == (2, 10) and out.dtype == torch.bfloat16
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
