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


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory):
    """A corpus of three groups (12 documents each) and a BPE tokenizer trained on it: (file, tokenizer dir)."""
    from capshape.tasks.corpus import train_tokenizer
    from helpers import group_documents, write_corpus

    root = tmp_path_factory.mktemp("corpus")
    path = write_corpus(root, group_documents(("alpha", "beta", "gamma"), per_group=12))
    return path, train_tokenizer([path], root / "tok", vocab_size=300)
