"""Training: recipes, the trainer in parts (setup, state, loop, callbacks, plan), optimizers, distributed."""
import sys
import types

from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..runs import TrainConfig, load_model
from .callbacks import Callback
from .config import RECIPES, resolve_config
from .loop import NonFiniteLossError, TrainingInterrupted, evaluate
from .setup import TrainSetup, build_setup, pick_device
from .state import TrainState
from .trainer import RunResult, fit, train

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "RECIPES", "TrainConfig", "resolve_config",
           "Callback", "NonFiniteLossError", "RunResult", "TrainingInterrupted", "TrainSetup", "TrainState",
           "build_setup", "evaluate", "fit", "load_model", "pick_device", "train"]


class _CallableModule(types.ModuleType):
    """``moderncnn.train`` is both this package and the function: ``moderncnn.train(epochs=3)`` calls
    :func:`train`, ``moderncnn.train.Callback`` is the callback base."""

    def __call__(self, *args, **kwargs) -> RunResult:
        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
