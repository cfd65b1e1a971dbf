"""The corpus suite: packing keeps per-token group ids at document boundaries, held-out split by document,
a trained tokenizer that loads offline, clear errors, and a tiny Llama trained with grouped loss on the
shipped corpus config."""
import json
import tomllib

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from capshape.config import build_config  # noqa: E402
from capshape.errors import CapshapeError  # noqa: E402
from capshape.tasks.corpus import load_tokenizer, pack_documents, train_tokenizer  # noqa: E402
from capshape.tasks.tokenizer import IGNORE  # noqa: E402
from capshape.train import RunSpec, prepare_data, train_run  # noqa: E402
from helpers import TINY_LLAMA, group_documents, write_corpus  # noqa: E402

EOS, PAD = 1, 0


def test_packing_keeps_per_token_group_ids_at_document_boundaries():
    documents = [[5, 6, 7, EOS], [8, 9, EOS], [10, 11, 12, 13, EOS]]  # groups 0, 2, 1
    inputs, labels, groups = pack_documents(documents, [0, 2, 1], length=4, pad=PAD)
    stream = [t for d in documents for t in d]
    owner = [g for d, g in zip(documents, [0, 2, 1]) for _ in d]
    assert inputs.shape == labels.shape == groups.shape == (3, 4)  # 12 tokens -> 11 (input, next) pairs -> 3 rows
    flat_inputs, flat_labels, flat_groups = inputs.flatten().tolist(), labels.flatten().tolist(), groups.flatten().tolist()
    assert flat_inputs[:11] == stream[:-1] and flat_labels[:11] == stream[1:] and flat_groups[:11] == owner[1:]
    assert flat_labels[11] == IGNORE and flat_groups[11] == -1 and flat_inputs[11] == PAD
    # the position holding a document's EOS predicts the next document's first token, in that document's group
    eos_at = flat_inputs.index(EOS)
    assert flat_labels[eos_at] == 8 and flat_groups[eos_at] == 2 and flat_groups[eos_at - 1] == 0
    assert len(set(groups[1].tolist())) > 1  # a row holding two groups


def corpus(tmp_path, rows):
    return write_corpus(tmp_path, rows)


def rows():
    return group_documents(("alpha", "beta"))


def config_for(tmp_path, files, tokenizer, **params):
    return build_config({
        "seeds": [0], "objectives": ["grouped"],
        "data": {"suite": "corpus", "train_examples": 1000, "eval_examples": 16,
                 "suite_params": {"files": [str(f) for f in files], "tokenizer": str(tokenizer), "held_out": 0.2, **params}},
        "model": TINY_LLAMA,
        "train": {"steps": 3, "batch_size": 4, "eval_every": 3, "checkpoint_every": 3, "warmup_steps": 1, "threads": 1}})


def test_the_suite_holds_out_whole_documents_per_group_and_trains(tmp_path):
    path = corpus(tmp_path, rows())
    tokenizer_dir = train_tokenizer([path], tmp_path / "tok", vocab_size=300)
    tokenizer = load_tokenizer(tokenizer_dir)
    assert tokenizer.eos_token == "<eos>" and 258 <= len(tokenizer) <= 300  # 256 bytes + 2 specials, then merges
    config = config_for(tmp_path, [path], tokenizer_dir)
    data = prepare_data(config, 0).data
    assert [d.task.name for d in data] == ["alpha", "beta"]
    for d in data:
        held = set(d.held_out.targets[0].split("<eos>"))
        train_text = "".join(d.train.targets)
        held_docs = [doc for doc in held if doc.strip()]
        assert held_docs and all(doc not in train_text for doc in held_docs)  # no held-out document in training rows
        word = {"alpha": "apple", "beta": "banana"}[d.task.name]
        assert all(word in text for text in d.train.targets + d.held_out.targets)  # a row holds its group's documents
    summary = train_run(RunSpec.of(config, "grouped", 0), tmp_path / "run")
    assert set(summary["suite_metrics"]["perplexity"]) == {"alpha", "beta"}
    assert all(p > 1 for p in summary["suite_metrics"]["perplexity"].values())


def test_protocols_choose_groups_by_name_with_the_same_held_out_documents(tmp_path):
    from capshape.tasks import select_tasks, suite_task_names
    rows3 = rows() + [{"text": f"cherry number {i} is here.", "group": "gamma"} for i in range(10)]
    path = corpus(tmp_path, rows3)
    tok = train_tokenizer([path], tmp_path / "tok", vocab_size=300)
    config = config_for(tmp_path, [path], tok)
    assert suite_task_names(config.data, "unlearn.forget") == ["alpha", "beta", "gamma"]
    every = {d.task.name: d for d in prepare_data(config, 0).data}
    chosen = config.model_copy(update={"data": select_tasks(config.data, ["gamma", "alpha"], ["beta"])})
    assert suite_task_names(chosen.data, "x") == ["gamma", "alpha"]
    prepared = prepare_data(chosen, 0)
    assert [d.task.name for d in prepared.data] == ["gamma", "alpha", "beta"] and prepared.suite.trained == [True, True, False]
    for d in prepared.data:  # a stage sees exactly the documents the full run holds out
        assert torch.equal(d.held_out.inputs, every[d.task.name].held_out.inputs)
    for params, message in (({"groups": ["delta"]}, "'delta' is not a group"), ({"groups": ["alpha"], "eval_only": ["alpha"]}, "both"),
                            ({"eval_only": ["alpha", "beta", "gamma"]}, "leave at least one")):
        with pytest.raises(CapshapeError, match=message):
            prepare_data(config_for(tmp_path, [path], tok, **params), 0)
    text = build_config({"data": {"tasks": ["add", "copy"]}})
    assert suite_task_names(select_tasks(text.data, ["copy"], ["add"]), "x") == ["copy"]
    with pytest.raises(CapshapeError, match="data.suite 'digits' has no tasks"):
        suite_task_names(build_config({"data": {"suite": "digits"}}).data, "unlearn.forget")


@pytest.mark.parametrize("change, message", [
    (lambda tmp_path, path, tok: ([tmp_path / "missing.jsonl"], tok, {}), "does not exist"),
    (lambda tmp_path, path, tok: ([path], tmp_path / "no_tokenizer", {}), "capshape tokenizer train"),
    (lambda tmp_path, path, tok: ([path], tok, {"group_field": "domain"}), "no column 'domain'"),
])
def test_corpus_errors_name_the_field(tmp_path, change, message):
    path = corpus(tmp_path, rows())
    tok = train_tokenizer([path], tmp_path / "tok", vocab_size=300)
    files, tokenizer, params = change(tmp_path, path, tok)
    with pytest.raises(CapshapeError, match=message) as info:
        prepare_data(config_for(tmp_path, files, tokenizer, **params), 0)
    assert "\n" not in str(info.value)


def test_the_shipped_corpus_config_builds_offline():
    with open("configs/corpus_tiny.toml", "rb") as handle:
        config = build_config(tomllib.load(handle))
    data = prepare_data(config, 0)
    assert [d.task.name for d in data.data] == ["arithmetic", "code", "stories", "arithmetic/probe", "code/probe",
                                                "stories/probe"]
    assert data.suite.trained == [True] * 3 + [False] * 3
    assert all(d.train.inputs.shape[1] == 64 and len(d.held_out.inputs) > 0 for d in data.data)
    assert data.suite.input_spec.vocab_size == 300


def test_tokenizer_train_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from capshape.cli import app
    path = corpus(tmp_path, rows())
    result = CliRunner().invoke(app, ["tokenizer", "train", str(path), "--out", str(tmp_path / "tok"), "--vocab-size", "280"])
    assert result.exit_code == 0, result.output
    assert load_tokenizer(tmp_path / "tok").eos_token == "<eos>"
    bad = CliRunner().invoke(app, ["tokenizer", "train", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "t2")])
    assert bad.exit_code == 2 and "does not exist" in bad.output and "Traceback" not in bad.output


def test_probes_put_labels_on_the_target_tokens_only(tmp_path):
    path = corpus(tmp_path, rows())
    tok_dir = train_tokenizer([path], tmp_path / "tok", vocab_size=300)
    tokenizer = load_tokenizer(tok_dir)
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"prompt": "apple number", "target": " 3 is here.", "group": "alpha"}) + "\n")
    data = prepare_data(config_for(tmp_path, [path], tok_dir, probes=[str(probes)]), 0)
    probe = next(d for d in data.data if d.task.name == "alpha/probe")
    prompt = tokenizer("apple number", add_special_tokens=False)["input_ids"]
    target = tokenizer(" 3 is here.", add_special_tokens=False)["input_ids"]
    labels, inputs = probe.held_out.labels[0], probe.held_out.inputs[0]
    assert labels[labels != IGNORE].tolist() == target
    first = len(prompt) - 1  # the prompt's last token predicts the target's first
    assert inputs[:first + 1].tolist() == prompt and labels[first].item() == target[0]
    assert probe.held_out.targets == [" 3 is here."]
    probes.write_text("{not json}\n")
    with pytest.raises(CapshapeError, match="line 1 is not a JSON object"):
        prepare_data(config_for(tmp_path, [path], tok_dir, probes=[str(probes)]), 0)


def mixed_config(tmp_path, **train):
    documents = group_documents(("alpha", "beta", "gamma"), per_group=12)
    path = corpus(tmp_path, documents)
    config = config_for(tmp_path, [path], train_tokenizer([path], tmp_path / "tok", vocab_size=300), packing="mixed",
                        eval_only=["gamma"])
    return config.model_copy(update={"train": config.train.model_copy(update={"batch_size": 6, "grad_clip": None, **train})})


def test_mixed_packing_puts_several_groups_in_a_row_with_per_token_ids(tmp_path):
    config = mixed_config(tmp_path)
    mixed = prepare_data(config, 0).data
    grouped = prepare_data(config.model_copy(update={"data": config.data.model_copy(
        update={"suite_params": {**config.data.suite_params, "packing": "group"}})}), 0).data
    names = [d.task.name for d in mixed]
    assert names == ["alpha", "beta", "gamma"]
    for index, d in enumerate(mixed[:2]):
        groups = d.train.token_groups
        assert groups.shape == d.train.labels.shape
        assert torch.equal(groups >= 0, d.train.labels != IGNORE)  # a group on every target token, none elsewhere
        assert (groups[:, 0] == index).all()  # a row sits in the pool of its first token's group
        words = {0: "apple", 1: "banana"}
        for row_labels, row_groups in zip(d.train.labels, groups):  # each token's group is its document's
            for group, word in words.items():
                tokens = row_labels[row_groups == group]
                if len(tokens) > 8:
                    from capshape.tasks.corpus import load_tokenizer
                    assert word in load_tokenizer(config.data.suite_params["tokenizer"]).decode(tokens.tolist())
    assert any(len(set(row[row >= 0].tolist())) > 1 for d in mixed[:2] for row in d.train.token_groups)
    assert mixed[2].train.token_groups is None  # gamma is evaluated only: never packed into training rows
    for a, b in zip(mixed, grouped):  # the held-out documents and their rows do not depend on the packing
        assert torch.equal(a.held_out.inputs, b.held_out.inputs) and a.held_out.token_groups is None
    assert sum(len(d.train.inputs) for d in mixed[:2]) <= sum(len(d.train.inputs) for d in grouped[:2])


def test_mixed_packing_makes_every_target_token_a_unit_of_the_grouped_loss(tmp_path):
    import copy

    from capshape.models import build_model
    from capshape.objectives import build_objective
    from capshape.train.loop import StepHooks, make_optimizer, training_step
    config = mixed_config(tmp_path)
    data = prepare_data(config, 0)
    torch.manual_seed(0)
    model = build_model(config.model, data.suite.input_spec)
    batch = data.sampler(config, 0).sample()
    assert batch.token_groups is not None and set(batch.token_groups.unique().tolist()) <= {-1, 0, 1}
    reference = copy.deepcopy(model)
    logits = reference(batch.inputs)
    token_losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.labels, ignore_index=IGNORE,
                                                     reduction="none")
    direct = sum(token_losses[batch.token_groups == g].mean() ** 2 for g in batch.token_groups.unique().tolist() if g >= 0)
    direct.backward()
    objective = build_objective("grouped", {}, len(data.group_names))
    result = training_step(0, config, model, objective, make_optimizer(model, config), data.sampler(config, 0),
                           StepHooks(), "cpu")
    assert result.losses.shape == ((batch.token_groups >= 0).sum(),)  # one unit per target token
    assert float(result.weighting.value) == pytest.approx(float(direct.detach()), rel=1e-5)
    grads = lambda m: torch.cat([p.grad.flatten() for p in m.parameters()])
    torch.testing.assert_close(grads(model), grads(reference), atol=1e-6, rtol=1e-4)
    accumulated = config.model_copy(update={"train": config.train.model_copy(update={"accumulation_steps": 3})})
    torch.manual_seed(0)
    twin = build_model(config.model, data.suite.input_spec)
    training_step(0, accumulated, twin, build_objective("grouped", {}, len(data.group_names)), make_optimizer(twin, config),
                  data.sampler(config, 0), StepHooks(), "cpu")
    torch.testing.assert_close(grads(twin), grads(reference), atol=1e-6, rtol=1e-4)


def test_mixed_packing_refuses_per_example_groupings_and_step_hooks(tmp_path):
    from capshape.train import StepHooks, check_config
    config = mixed_config(tmp_path)
    with pytest.raises(CapshapeError, match="objective 'gradient_cluster' finds groups per example"):
        check_config(config.model_copy(update={"objectives": ["gradient_cluster"]}))
    with pytest.raises(CapshapeError, match="packing='mixed': this protocol's step hooks"):
        train_run(RunSpec.of(config, "grouped", 0, hooks=StepHooks()), tmp_path / "run")
    summary = train_run(RunSpec.of(config, "grouped", 0), tmp_path / "ok")
    assert set(summary["suite_metrics"]["perplexity"]) == {"alpha", "beta", "gamma"}
