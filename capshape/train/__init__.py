"""The training loop, held-out evaluation, checkpoints and the run directory writer."""
from capshape.train.checkpoint import load_model, read_tensors, save_model
from capshape.train.evaluate import evaluate
from capshape.train.loop import (RunData, RunSpec, StepHooks, TrainRuntime, check_config, initial_model, learning_rate,
                                 prepare_data, train_run)

__all__ = ["train_run", "RunSpec", "TrainRuntime", "StepHooks", "RunData", "check_config", "prepare_data",
           "initial_model", "learning_rate", "evaluate", "load_model", "save_model", "read_tensors"]
