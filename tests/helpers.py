"""What the tests share: the smallest transformer they train (a TOML [model] table) and a training run
interrupted part-way."""
import pytest

from capshape.train import RunSpec, TrainRuntime, train_run

TINY_MODEL = """
[model]
n_layer = 1
n_head = 2
d_model = 16
d_mlp = 32
max_len = 24
"""


def interrupted_run(config, objective: str, out, at_step: int) -> None:
    """Trains `config` into `out` and crashes it (RuntimeError "simulated crash") when step `at_step` reports."""

    def crash(step, loss):
        if step == at_step:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(RunSpec.of(config, objective, 0), out, TrainRuntime(on_progress=crash))
