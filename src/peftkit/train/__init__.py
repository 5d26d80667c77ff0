"""Training: `run_training(config)` (the loop behind `peftkit train CONFIG.yaml`), its config and tasks."""
from .config import DEFAULT_CONFIG, TrainConfig, TrainConfigError, config_from_mapping, load_config
from .tasks import MODELS, TASKS, DataError, RowStats, Rows, Task, TaskData, register_model, register_task
from .trainer import Callback, Trainer, TrainResult, prepare, run_training

__all__ = [
    "DEFAULT_CONFIG", "MODELS", "TASKS", "Callback", "DataError", "RowStats", "Rows", "Task", "TaskData",
    "TrainConfig", "TrainConfigError", "TrainResult", "Trainer", "config_from_mapping", "load_config", "prepare",
    "register_model", "register_task", "run_training",
]
