"""Training: the loop, optimizers and schedules, checkpoints, distributed helpers."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import RECIPES, TrainConfig, resolve_config
from .engine import (NonFiniteLossError, RunResult, TrainingInterrupted, evaluate, load_model, pick_device,
                     train)

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint", "RECIPES", "TrainConfig", "resolve_config",
           "NonFiniteLossError", "RunResult", "TrainingInterrupted", "evaluate", "load_model", "pick_device",
           "train"]
