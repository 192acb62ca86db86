"""Recipes merged with a user's options by resolve_config."""
import pytest

import moderncnn
from moderncnn.training import TrainConfig, resolve_config


def test_recipes_and_explicit_overrides():
    d2l = resolve_config(TrainConfig(recipe="d2l", model="alexnet_d2l"))
    assert (d2l.lr, d2l.batch_size, d2l.image_size, d2l.epochs) == (0.01, 128, 224, 10)
    assert d2l.momentum == 0.0 and d2l.weight_decay == 0.0 and d2l.augment == "none" and d2l.init == "xavier"
    dn = resolve_config(TrainConfig(recipe="d2l", model="densenet_d2l"))
    assert (dn.lr, dn.batch_size, dn.image_size) == (0.1, 256, 96)
    mine = resolve_config(TrainConfig(recipe="d2l", model="densenet_d2l", lr=0.3, epochs=2))
    assert (mine.lr, mine.epochs, mine.batch_size) == (0.3, 2, 256)
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve_config(TrainConfig(recipe="nope"))


def test_recipe_model_arguments_belong_to_the_recipes_model():
    recipe_kwargs = {"bn_size": 4, "stem_stride": 1, "stem_pool": True}
    best = resolve_config(TrainConfig(recipe="fmnist-best"))
    assert best.model == "densenet_bc_fmnist" and best.model_kwargs == recipe_kwargs
    assert (best.optimizer, best.muon_lr, best.lr) == ("muon", 0.05, 0.2)
    mine = resolve_config(TrainConfig(recipe="fmnist-best", model_kwargs={"bn_size": 3, "drop_rate": 0.1}))
    assert mine.model_kwargs == {"bn_size": 3, "stem_stride": 1, "stem_pool": True, "drop_rate": 0.1}  # user's win
    other = resolve_config(TrainConfig(recipe="fmnist-best", model="resnet18"))
    assert other.model_kwargs == {}
    assert resolve_config(TrainConfig(recipe="fmnist-best")).model_kwargs == recipe_kwargs  # recipe not consumed
    cifar = resolve_config(TrainConfig(recipe="cifar10"))
    assert cifar.model == "densenet_bc_cifar" and cifar.model_kwargs == {}
    assert cifar.amp == "auto" and cifar.eval_every == 5
    assert (cifar.optimizer, cifar.muon_lr, cifar.lr) == ("muon", 0.05, 0.2)
    gpu = resolve_config(TrainConfig(recipe="cifar10-gpu"))
    assert (gpu.model, gpu.optimizer, gpu.muon_lr, gpu.lr, gpu.epochs) == ("densenet_bc_100", "muon", 0.05, 0.4, 25)
    assert gpu.amp and gpu.channels_last and gpu.batch_size == 512
    # the registered default model has a 2k bottleneck; the recipe's 4k one has about twice the parameters
    small = moderncnn.create_model("densenet_bc_fmnist", num_classes=10, in_chans=1)
    paper = moderncnn.create_model("densenet_bc_fmnist", num_classes=10, in_chans=1, bn_size=4)
    assert small.features.denseblock1.denselayer1.conv1.out_channels == 32
    assert paper.features.denseblock1.denselayer1.conv1.out_channels == 64
