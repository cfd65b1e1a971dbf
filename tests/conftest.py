import pytest

from capshape.config import build_config


@pytest.fixture
def tiny_config():
    """A laptop-second config: 2 tasks, width 16, a few steps."""
    return build_config({
        "seeds": [0], "objectives": ["mean"],
        "data": {"tasks": ["copy", "add"], "train_examples": 200, "eval_examples": 32},
        "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "d_mlp": 32, "max_len": 16},
        "train": {"steps": 12, "batch_size": 8, "eval_every": 4, "checkpoint_every": 4, "warmup_steps": 2, "threads": 1},
    })
