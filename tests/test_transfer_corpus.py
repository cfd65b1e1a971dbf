"""The transfer protocol on a corpus with a tiny Hugging Face Llama: stages hold only their groups, A->B and
B-only cells of a seed see the same B rows, the summary is indexed by the groups and led by the loss, and
corpus-specific config errors are one line."""
import copy
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from capshape.config import RunConfig, build_config  # noqa: E402
from capshape.errors import CapshapeError  # noqa: E402
from capshape.experiments import build_report, kit  # noqa: E402
from capshape.experiments import transfer as protocol  # noqa: E402
from capshape.experiments.transfer import TransferConfig, cell_dir, cell_specs, stage_a_dir  # noqa: E402
from capshape.models import build_model  # noqa: E402
from capshape.runstore import read_json  # noqa: E402
from capshape.tasks import InputSpec  # noqa: E402
from capshape.tasks.corpus import load_tokenizer  # noqa: E402
from capshape.train import prepare_data  # noqa: E402
from helpers import GROUP_WORDS, TINY_LLAMA  # noqa: E402
from test_transfer import run_in_process  # noqa: E402

WORDS = GROUP_WORDS



def corpus_config(corpus_files, **transfer) -> TransferConfig:
    path, tokenizer = corpus_files
    raw = {
        "workers": 1,
        "data": {"suite": "corpus", "train_examples": 1000, "eval_examples": 8,
                 "suite_params": {"files": [str(path)], "tokenizer": str(tokenizer), "held_out": 0.2}},
        "model": TINY_LLAMA,
        "train": {"batch_size": 4, "warmup_steps": 1, "threads": 1},
        "transfer": {"tasks": ["alpha", "beta"], "pretrain_tasks": ["gamma"], "pretrain_steps": 3, "seeds": [0, 1],
                     "n_a": 4, "n_b": 2, "baseline_n_b": [4], "epochs_b": 1.0, "steps_a": 3, "steps_b": 2,
                     "batch_a": 4, "batch_b": 2, "proxy_steps": 2, "proxy_every": 1, "metric": "loss",
                     "learnable_gain": 0.0, **transfer},
    }
    return build_config(copy.deepcopy(raw), schema=TransferConfig)


@pytest.fixture(scope="module")
def corpus_grid(corpus_files, tmp_path_factory):
    out, config = tmp_path_factory.mktemp("corpus_transfer"), corpus_config(corpus_files)
    return config, out, run_in_process("transfer", config, out)


def stage_data(run_dir, seed):
    """{task: TaskData} and the trained task names of a stage, rebuilt from its config.json."""
    config = RunConfig.model_validate(read_json(run_dir / "config.json"))
    suite = prepare_data(config, seed).suite
    return {d.task.name: d for d in suite.data}, [d.task.name for d, trained in zip(suite.data, suite.trained) if trained]


def test_stages_train_on_their_group_only_and_cells_are_paired(corpus_grid):
    config, out, summary = corpus_grid
    assert summary["failed"] == {} and summary["cells"] == summary["expected_cells"] == 2 * (2 + 2 * 2)
    for a, b, n_a, n_b, seed in cell_specs(config):
        stage_b = cell_dir(out, a, b, n_a, n_b, seed) / "stage_b"
        params = read_json(stage_b / "config.json")["data"]["suite_params"]
        assert params["groups"] == [b] and params["eval_only"] == []
        data, trained = stage_data(stage_b, seed)
        assert trained == [b] and len(data[b].train.inputs) == n_b
        assert all(WORDS[b] in row and not any(w in row for w in set(WORDS.values()) - {WORDS[b]})
                   for row in data[b].train.targets), "a stage-B row holds another group's text"
        alone, _ = stage_data(cell_dir(out, None, b, 0, n_b, seed) / "stage_b", seed)
        assert torch.equal(data[b].train.inputs, alone[b].train.inputs), "A->B and B-only see different B rows"
        assert torch.equal(data[b].held_out.inputs, alone[b].held_out.inputs)
        if a is not None:
            stage_a, stage_a_trained = stage_data(stage_a_dir(out, a, n_a, seed), seed)
            assert stage_a_trained == [a] and len(stage_a[a].train.inputs) == n_a
            assert torch.equal(stage_a[b].held_out.inputs, data[b].held_out.inputs)
    base = read_json(out / "base" / "config.json")["data"]["suite_params"]
    assert base["groups"] == ["gamma"] and base["eval_only"] == ["alpha", "beta"]


def test_the_summary_is_indexed_by_the_groups_and_led_by_the_loss(corpus_grid, corpus_files):
    config, out, summary = corpus_grid
    assert summary["tasks"] == ["alpha", "beta"]
    loss = summary["metrics"]["loss"]["transfer"]
    assert loss["mean"][0][0] is None and loss["mean"][0][1] is not None and loss["n"] == [[0, 2], [2, 0]]
    assert summary["learnability"]["metric"] == "loss" and set(summary["learnability"]["by_size"]["2"]) == {"alpha", "beta"}
    vocab = len(load_tokenizer(corpus_files[1]))
    with torch.device("meta"):
        expected = sum(p.numel() for p in build_model(config.model, InputSpec("tokens", vocab_size=vocab)).parameters())
    assert summary["parameters"] == expected
    assert summary["proxy"]["tasks"] == ["alpha", "beta"] and summary["proxy"]["measured_steps"] == 2
    lines = protocol.headline(summary)
    assert "nats" in lines[0]
    first_transfer = next(line for line in lines if "transfer (" in line)
    assert first_transfer.strip().startswith("loss transfer (nats): most")
    assert "Held-out loss of B after fine-tuning the base on n examples of B alone" in build_report(out).read_text()


@pytest.mark.parametrize("transfer, data, message", [
    ({"tasks": ["alpha", "delta"]}, {}, "transfer.tasks: data.suite_params.groups: 'delta' is not a group of the corpus"),
    ({"pretrain_tasks": ["modadd"]}, {}, "transfer.pretrain_tasks: data.suite_params.groups: 'modadd' is not a group"),
    ({"widths": [32]}, {}, "transfer.widths sweeps model.d_model, which model.kind='hf' does not use"),
    ({"n_a": 500}, {}, "task 'alpha' has"),
    ({}, {"groups": ["alpha"]}, "config field 'data.suite_params.groups' is set by the transfer protocol"),
])
def test_corpus_config_errors_are_one_line(corpus_files, transfer, data, message):
    config = corpus_config(corpus_files, **transfer)
    if data:
        config = config.model_copy(update={"data": config.data.model_copy(
            update={"suite_params": {**config.data.suite_params, **data}})})
    with pytest.raises(CapshapeError) as info:
        kit.check(protocol.PROTOCOL, config)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_suite_without_named_tasks_is_refused_in_one_line():
    config = build_config({"data": {"suite": "digits"}, "transfer": {"tasks": ["a", "b"], "pretrain_tasks": []}},
                          schema=TransferConfig)
    with pytest.raises(CapshapeError, match="transfer.tasks: data.suite 'digits' has no tasks to choose from by name"):
        kit.check(protocol.PROTOCOL, config)
