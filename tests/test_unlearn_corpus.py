"""The unlearn protocol on a corpus with a tiny Hugging Face Llama: forget names a group, filter never trains
on it (its data holds it evaluated only), ERA's ablation changes the forget group's loss, the summary is
indexed by the groups, RMU takes the HF parameter names, and bad names are one-line errors."""
import copy

import pytest

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from capshape.config import build_config  # noqa: E402
from capshape.errors import CapshapeError  # noqa: E402
from capshape.experiments.unlearn import UnlearnConfig, check_unlearn_config, method_dir  # noqa: E402
from capshape.runstore import read_json  # noqa: E402
from capshape.train import prepare_data  # noqa: E402
from helpers import GROUP_WORDS, TINY_LLAMA  # noqa: E402
from test_transfer import run_in_process  # noqa: E402

WORDS = GROUP_WORDS



def unlearn_config(corpus_files, overrides=(), **unlearn) -> UnlearnConfig:
    path, tokenizer = corpus_files
    raw = {
        "seeds": [0, 1], "objectives": ["mean"], "workers": 1,
        "data": {"suite": "corpus", "train_examples": 1000, "eval_examples": 8,
                 "suite_params": {"files": [str(path)], "tokenizer": str(tokenizer), "held_out": 0.2}},
        "model": TINY_LLAMA,
        "train": {"steps": 6, "batch_size": 4, "lr": 1e-2, "eval_every": 3, "checkpoint_every": 3, "warmup_steps": 1,
                  "threads": 1},
        "unlearn": {"forget": ["beta"], "methods": ["filter", "era", "moe", "gradient_ascent", "rmu", "undo"],
                    "post_steps": 3, "era": {"neurons": 8, "select_every": 1}, "moe": {"expert_units": 8},
                    "rmu": {"trainable": ["hf.model.layers.0."]}, "undo": {"steps": 2},
                    "relearn": {"sizes": [2], "seeds": [0], "steps": 2, "batch_size": 2},
                    "digits": {"enabled": False}, "icl": {"enabled": False}, **unlearn},
    }
    return build_config(copy.deepcopy(raw), list(overrides), schema=UnlearnConfig)


def test_unlearn_forgets_a_group_of_the_corpus(corpus_files, tmp_path):
    out = tmp_path / "out"
    summary = run_in_process("unlearn", unlearn_config(corpus_files), out)
    assert summary["forget"] == ["beta"] and summary["retain"] == ["alpha", "gamma"]
    assert list(summary["methods"]) == ["plain", "filter", "era", "moe", "gradient_ascent", "rmu", "undo"]
    for seed in ("0", "1"):
        assert set(summary["methods"]["plain"]["per_seed"][seed]["final"]["tasks"]) == set(WORDS)
    # filter's stage trained on the retain groups only: the forget group is evaluated, never sampled
    filtered = read_json(method_dir(out, "filter", 0) / "train" / "config.json")
    assert filtered["data"]["suite_params"]["groups"] == ["alpha", "gamma"]
    assert filtered["data"]["suite_params"]["eval_only"] == ["beta"]
    stage = prepare_data(build_config(filtered), 0)
    assert [(d.task.name, t) for d, t in zip(stage.data, stage.suite.trained)] == [("alpha", True), ("gamma", True),
                                                                                   ("beta", False)]
    # ERA: removing the added units (what the forget group's gradients were routed to) changes its loss
    era = summary["methods"]["era"]["per_seed"]
    for seed in ("0", "1"):
        assert era[seed]["ablated"]["forget"]["loss"] != era[seed]["trained"]["forget"]["loss"]
    paired = summary["methods"]["era"]["vs_filter"]["forget_loss"]
    assert paired["n"] == 2 and paired["diff"] == pytest.approx(
        sum(summary["methods"]["era"]["per_seed"][s]["final"]["forget"]["loss"]
            - summary["methods"]["filter"]["per_seed"][s]["final"]["forget"]["loss"] for s in ("0", "1")) / 2)
    attack = summary["relearn"]["era"]["by_size"]["2"]
    assert attack["runs"] == 2 and attack["min_loss"]["mean"] > 0
    relearn_config = read_json(out / "relearn" / "era" / "seed0" / "n2-seed0" / "config.json")
    assert relearn_config["data"]["suite_params"]["groups"] == ["beta"] and relearn_config["data"]["train_examples"] == 2


@pytest.mark.parametrize("overrides, message", [
    (['unlearn.forget=["delta"]'], r"unlearn.forget: 'delta' is not in the trained tasks of data.suite 'corpus'"),
    (['unlearn.forget=["alpha", "beta", "gamma"]'], "leave at least one task to retain"),
    (['data.suite_params.eval_only=["gamma"]'], "data.suite_params.eval_only"),
    (['unlearn.rmu.trainable=["blocks.0."]'], "unlearn.rmu.trainable: .* e.g. 'hf.model.layers.0.'"),
    (["unlearn.era.blocks=[1]"], r"unlearn.era.blocks: block 1 does not exist \(model.n_layer = 1\)"),
    (['unlearn.methods=["sgtm"]'], "unlearn.sgtm: .* model.kind='transformer'"),
])
def test_corpus_config_errors_are_one_line(corpus_files, overrides, message):
    with pytest.raises(CapshapeError, match=message) as info:
        check_unlearn_config(unlearn_config(corpus_files, overrides))
    assert "\n" not in str(info.value)
