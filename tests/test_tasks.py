import json
import random

import pytest
import torch

from capshape.errors import CapshapeError
from capshape.tasks import TASKS, TOKENIZER, MixtureSampler, build_task_data, load_jsonl_tasks, mixture_weights
from capshape.tasks.tokenizer import EOS, IGNORE


@pytest.mark.parametrize("name", TASKS.names())
def test_held_out_prompts_never_occur_in_training(name):
    data = build_task_data(TASKS.get(name), n_train=2000, n_eval=128, seed=3, max_len=24)
    assert len(set(data.held_out.prompts)) == 128
    assert not set(data.train.prompts) & set(data.held_out.prompts)


def test_generation_is_deterministic_per_seed():
    a = build_task_data(TASKS.get("add"), 100, 20, seed=1, max_len=24)
    b = build_task_data(TASKS.get("add"), 100, 20, seed=1, max_len=24)
    c = build_task_data(TASKS.get("add"), 100, 20, seed=2, max_len=24)
    assert a.train.prompts == b.train.prompts and torch.equal(a.train.inputs, b.train.inputs)
    assert a.train.prompts != c.train.prompts


@pytest.mark.parametrize("name, text, answer", [
    ("add", "12+34", "46"), ("sub", "3-10", "-7"), ("mul", "12*3", "36"), ("div", "17/5", "3"),
    ("modadd", "90+10", "3"), ("invented", "9&4", "3"), ("reverse", "abc", "cba"), ("sort", "3102", "0123"),
    ("copy", "xyz", "xyz"), ("kv", "a=1;b=7;c=3|b", "7"), ("rev_add", "21+43", "46"), ("add_rev", "12+34", "64"),
])
def test_solvers(name, text, answer):
    assert TASKS.get(name).solve(text) == answer


def test_composed_task_chains_its_parts():
    rng = random.Random(0)
    for _ in range(50):
        text = TASKS.get("add").sample_input(rng)
        assert TASKS.get("rev_add").solve(text) == TASKS.get("add").solve(TASKS.get("reverse").solve(text))
    assert TASKS.get("rev_add").parts == ("reverse", "add")


def test_tokenizer_pairs_mark_only_target_and_eos():
    inputs, labels = TOKENIZER.encode_pair("A:1+2", "3")
    assert len(inputs) == len(labels) == len("A:1+2") + 3
    assert [t for t in labels if t != IGNORE] == TOKENIZER.encode("3") + [EOS]
    assert TOKENIZER.decode(TOKENIZER.encode("Ab9+")) == "Ab9+"
    with pytest.raises(CapshapeError, match="not in the tokenizer"):
        TOKENIZER.encode("é")


def test_too_long_examples_name_the_field():
    with pytest.raises(CapshapeError, match="model.max_len"):
        build_task_data(TASKS.get("kv"), 10, 5, seed=0, max_len=8)


def test_mixture_weights():
    torch.testing.assert_close(mixture_weights(["a", "b"], "uniform"), torch.tensor([0.5, 0.5]))
    zipf = mixture_weights(["a", "b", "c"], "zipf", zipf_exponent=1.0)
    torch.testing.assert_close(zipf, torch.tensor([1, 1 / 2, 1 / 3]) / (11 / 6))
    torch.testing.assert_close(mixture_weights(["a", "b"], "explicit", explicit={"a": 3, "b": 1}), torch.tensor([0.75, 0.25]))
    with pytest.raises(CapshapeError, match="data.weights"):
        mixture_weights(["a", "b"], "explicit", explicit={"a": 1})
    with pytest.raises(CapshapeError, match="data.weights"):
        mixture_weights(["a"], "explicit", explicit={"a": 1, "z": 1})


def test_stratified_sampler_puts_every_group_in_every_batch_and_follows_weights():
    data = [build_task_data(TASKS.get(n), 200, 10, 0, 24) for n in ("add", "copy", "sort")]
    weights = torch.tensor([0.8, 0.1, 0.1])
    sampler = MixtureSampler(data, weights, [0, 1, 1], batch_size=10, stratify=True, seed=0)
    counts = torch.zeros(3)
    for _ in range(300):
        batch = sampler.sample()
        assert set(batch.task_ids.tolist()) == {0, 1, 2}
        assert torch.equal(batch.group_ids, torch.tensor([0, 1, 1])[batch.task_ids])
        counts += torch.bincount(batch.task_ids, minlength=3)
    expected = 1 + 7 * weights  # one fixed slot per task + 7 drawn from the mixture
    torch.testing.assert_close(counts / 300, expected, atol=0.15, rtol=0)
    free = MixtureSampler(data, weights, [0, 1, 2], batch_size=4000, stratify=False, seed=0).sample()
    torch.testing.assert_close(torch.bincount(free.task_ids).float() / 4000, weights, atol=0.03, rtol=0)


def test_sampler_state_restores_the_stream():
    data = [build_task_data(TASKS.get("copy"), 50, 10, 0, 24)]
    sampler = MixtureSampler(data, torch.ones(1), [0], 4, True, seed=5)
    state = sampler.state()
    first = sampler.sample().inputs
    sampler.load_state(state)
    assert torch.equal(sampler.sample().inputs, first)


def test_jsonl_tasks_load_and_split(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"q{i}", "target": str(i % 3), "group": "g1" if i % 2 else "g2"} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks = load_jsonl_tasks(path)
    assert [t.name for t in tasks] == ["mine/g1", "mine/g2"]
    data = build_task_data(tasks[0], 100, 5, 0, 16)
    assert len(data.held_out.prompts) == 5 and len(data.train.prompts) == 15
    assert not set(data.train.prompts) & set(data.held_out.prompts)


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 1: not valid JSON"),
    ('{"prompt": "a", "target": "b"}', "line 1: field 'group'"),
    ('{"prompt": "a", "target": "", "group": "g"}', "field 'target'"),
    ('{"prompt": "a", "target": "b", "group": "g", "x": 1}', "unknown field 'x'"),
    ('{"prompt": "aé", "target": "b", "group": "g"}', "not in the tokenizer"),
    ("[1, 2]", "expected an object"),
])
def test_bad_jsonl_lines_are_named(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(CapshapeError, match=message):
        load_jsonl_tasks(path)


def test_missing_jsonl_file(tmp_path):
    with pytest.raises(CapshapeError, match="does not exist"):
        load_jsonl_tasks(tmp_path / "nope.jsonl")


def test_digits_suite_splits_each_class_disjointly(tiny_config):
    from capshape.train import prepare_data

    config = tiny_config.model_copy(update={
        "data": tiny_config.data.model_copy(update={"suite": "digits", "train_examples": 1000}),
        "model": tiny_config.model.model_copy(update={"kind": "mlp", "width": 32}),
        "train": tiny_config.train.model_copy(update={"batch_size": 20})})
    prepared = prepare_data(config, seed=0)
    assert [d.task.name for d in prepared.data] == [f"digit_{i}" for i in range(10)]
    for task_data in prepared.data:
        train_rows = {tuple(row.tolist()) for row in task_data.train.inputs}
        held_rows = [tuple(row.tolist()) for row in task_data.held_out.inputs]
        assert len(held_rows) >= 40 and len(task_data.train.inputs) >= 120
        assert set(task_data.train.labels.tolist()) == set(task_data.held_out.labels.tolist()) == {int(task_data.task.name[-1])}
        assert sum(row in train_rows for row in held_rows) <= 2  # the data set itself holds a few duplicate images


def test_digits_suite_trains_an_mlp(tmp_path, tiny_config):
    from capshape.train import RunSpec, train_run

    config = tiny_config.model_copy(update={
        "data": tiny_config.data.model_copy(update={"suite": "digits"}),
        "model": tiny_config.model.model_copy(update={"kind": "mlp", "width": 32}),
        "train": tiny_config.train.model_copy(update={"batch_size": 20, "steps": 40, "eval_every": 20, "lr": 1e-2})})
    summary = train_run(RunSpec.of(config, "grouped", 0), tmp_path / "r")
    assert summary["mean_accuracy"] > 0.3


@pytest.mark.parametrize("burstiness", [1, 4])
def test_bursty_batches_are_runs_of_one_task_with_zipf_frequencies(burstiness):
    data = [build_task_data(TASKS.get(n), 100, 10, 0, 24) for n in ("add", "copy", "sort", "reverse")]
    weights = mixture_weights([d.task.name for d in data], "zipf", zipf_exponent=1.5)
    sampler = MixtureSampler(data, weights, [0, 1, 2, 3], batch_size=64, stratify=False, seed=0, burstiness=burstiness)
    counts = torch.zeros(4)
    for _ in range(200):
        batch = sampler.sample()
        runs = batch.task_ids.view(-1, burstiness)
        assert (runs == runs[:, :1]).all()  # every run is one task, exactly `burstiness` long
        for task_id, row in zip(batch.task_ids.tolist(), batch.inputs):
            assert row[1] == TOKENIZER.encode(data[task_id].task.tag)[0]  # the example belongs to its task
        counts += torch.bincount(batch.task_ids, minlength=4)
    torch.testing.assert_close(counts / counts.sum(), weights, atol=0.02, rtol=0)


def test_burstiness_must_divide_the_batch():
    data = [build_task_data(TASKS.get("add"), 50, 10, 0, 24)]
    with pytest.raises(CapshapeError, match="data.burstiness"):
        MixtureSampler(data, torch.ones(1), [0], batch_size=10, stratify=False, seed=0, burstiness=4)


def test_stratified_batch_of_exactly_one_example_per_task():
    data = [build_task_data(TASKS.get(n), 50, 10, 0, 24) for n in ("add", "copy")]
    sampler = MixtureSampler(data, torch.tensor([0.5, 0.5]), [0, 1], batch_size=2, stratify=True, seed=0)
    assert sorted(sampler.sample().task_ids.tolist()) == [0, 1]
