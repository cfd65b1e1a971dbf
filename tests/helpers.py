"""What the tests share: the smallest transformer they train (a TOML [model] table), the smallest Hugging
Face Llama and document corpus, and a training run interrupted part-way."""
import json

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

TINY_LLAMA = {"kind": "hf", "max_len": 16, "hf_config": {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1,
                                                        "num_attention_heads": 2, "num_key_value_heads": 2,
                                                        "intermediate_size": 32, "max_position_embeddings": 16}}
GROUP_WORDS = {"alpha": "apple", "beta": "banana", "gamma": "cherry"}


def group_documents(groups=("alpha", "beta"), per_group: int = 10) -> list[dict]:
    """Documents of each group, each naming its group's word (so a row's text tells its group)."""
    return [{"text": f"{GROUP_WORDS[group]} number {i} is here.", "group": group} for group in groups for i in range(per_group)]


def write_corpus(directory, documents: list[dict]):
    path = directory / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in documents))
    return path


def interrupted_run(config, objective: str, out, at_step: int) -> None:
    """Trains `config` into `out` and crashes it (RuntimeError "simulated crash") when step `at_step` reports."""

    def crash(step, loss):
        if step == at_step:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(RunSpec.of(config, objective, 0), out, TrainRuntime(on_progress=crash))
