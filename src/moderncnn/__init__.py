"""moderncnn: the modern CNN family (AlexNet, VGG, NiN, GoogLeNet, ResNet, DenseNet) by name --
see it, train it, compare it, export it."""
__version__ = "0.1.0"

from .models import create_model, list_models, register_model, UnknownModelError, InputTooSmallError
from .models.inference import optimize_for_inference
from .report.summary import summary
from .train import TrainConfig, load_model, train

__all__ = ["__version__", "optimize_for_inference", "create_model", "list_models", "register_model", "summary", "train", "TrainConfig",
           "load_model",
           "UnknownModelError", "InputTooSmallError"]
