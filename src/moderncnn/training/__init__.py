"""Training: recipes, the trainer in parts (setup, state, loop, callbacks, plan), optimizers, distributed.

``moderncnn.train``, the function, is its front door."""
from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..runs import TrainConfig, load_model
from .callback import Callback
from .config import RECIPES
from .loop import NonFiniteLossError, TrainingInterrupted, evaluate
from .resolve import ResolvedConfig, pick_device, resolve_config
from .setup import TrainSetup, build_setup
from .state import TrainState
from .trainer import RunResult, fit, train

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "RECIPES", "TrainConfig", "ResolvedConfig", "resolve_config",
           "Callback", "NonFiniteLossError", "RunResult", "TrainingInterrupted", "TrainSetup", "TrainState",
           "build_setup", "evaluate", "fit", "load_model", "pick_device", "train"]

