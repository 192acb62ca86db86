"""The model zoo: every network by name (``create_model``), one module per family."""
from .registry import UnknownModelError, create_model, is_model, list_models, register_model
from .layers import ImageClassifier, InputTooSmallError
from . import alexnet, vgg, nin, googlenet, resnet, csp, densenet  # noqa: F401  (registers the models)
from .densenet import DenseNet
from .resnet import ResNet

__all__ = ["create_model", "list_models", "register_model", "is_model", "UnknownModelError",
           "ImageClassifier", "InputTooSmallError", "DenseNet", "ResNet"]
