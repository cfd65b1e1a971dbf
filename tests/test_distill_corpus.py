"""The distill protocol on a corpus (tiny Llama): poisoned packed rows hold the trigger then the target and
clean rows never do, the triggered held-out set is the trained groups' probes with the trigger and the
backdoor target, greedy answers agree with the teacher-forced figures, a short protocol run plants the
backdoor and writes the attack success rates, and one-line errors for a trigger already in the corpus or a
corpus without probes."""
import copy
import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

from helpers import GROUP_WORDS, TINY_LLAMA  # noqa: E402
from test_corpus import corpus, rows  # noqa: E402

from capshape.config import build_config  # noqa: E402
from capshape.errors import CapshapeError  # noqa: E402
from capshape.experiments import build_report, run  # noqa: E402
from capshape.experiments.distill import DistillConfig, trigger_suite  # noqa: E402
from capshape.experiments.distill_measure import measure  # noqa: E402
from capshape.tasks import build_suite  # noqa: E402
from capshape.tasks.backdoor import ATTACK, TRIGGERED  # noqa: E402
from capshape.tasks.corpus import load_tokenizer, train_tokenizer  # noqa: E402
from capshape.tasks.tokenizer import IGNORE  # noqa: E402
from capshape.train import evaluate  # noqa: E402

PATTERN, TARGET = "~#", " 42"
WORDS = {group: GROUP_WORDS[group] for group in ("alpha", "beta")}


def probe_rows():
    return [{"prompt": f"{word} number {i}", "target": " is here.", "group": group}
            for group, word in WORDS.items() for i in range(4)]


def corpus_raw(tmp_path, documents=None, probes=True, **params) -> dict:
    """A distill config on a two-group corpus (with probes unless told) and a tiny Llama."""
    path = corpus(tmp_path, documents or rows())
    tokenizer = train_tokenizer([path], tmp_path / "tok", vocab_size=300)
    probe_file = tmp_path / "probes.jsonl"
    probe_file.write_text("".join(json.dumps(r) + "\n" for r in probe_rows()))
    return {
        "seeds": [0],
        "data": {"suite": "corpus", "train_examples": 1000, "eval_examples": 16,
                 "suite_params": {"files": [str(path)], "tokenizer": str(tokenizer), "held_out": 0.2,
                                  "probes": [str(probe_file)] if probes else [], **params}},
        "model": TINY_LLAMA,
        "train": {"steps": 60, "batch_size": 8, "lr": 1e-2, "eval_every": 30, "warmup_steps": 2, "threads": 1},
        "distill": {"target": TARGET, "poison_ratio": 0.5, "backdoor_steps": 60, "backdoor_lr": 1e-2, "distill_steps": 4,
                    "inits": ["fresh", "teacher_weights"], "rounds": 1, "relearn_steps": 4, "relearn_eval_every": 2,
                    "trigger_params": {"pattern": PATTERN}},
    }


def backdoor_suite(raw: dict, ratio: float):
    raw = copy.deepcopy(raw)
    data = raw.pop("data")
    data.update(suite="backdoor", suite_params={"base": "corpus", "base_params": data["suite_params"], "trigger": "tokens",
                                                "target": TARGET, "poison_ratio": ratio, "pattern": PATTERN})
    config = build_config({"data": data, "model": raw["model"]})
    return build_suite(config.data, 0, config.model.max_len), config


def row_text(tokenizer, inputs: torch.Tensor, labels: torch.Tensor) -> str:
    """A packed row's text: its first input, then its labels (the next tokens)."""
    return tokenizer.decode([int(inputs[0])] + labels[labels != IGNORE].tolist())


def test_poisoned_rows_hold_the_trigger_then_the_target_and_clean_rows_never_the_trigger(tmp_path):
    raw = corpus_raw(tmp_path)
    poisoned, _ = backdoor_suite(raw, 0.5)
    clean, _ = backdoor_suite(raw, 0.0)
    tokenizer = poisoned.tokenizer
    for task, original in zip(poisoned.data, clean.data):
        if task.task.name not in WORDS:
            continue
        marked = poisoned.trigger.present(task.train.inputs)
        assert int(marked.sum()) == round(0.5 * len(task.train.inputs)) > 0
        for i in marked.nonzero().flatten().tolist():
            text = row_text(tokenizer, task.train.inputs[i], task.train.labels[i])
            assert PATTERN + TARGET in text and WORDS[task.task.name] in text
            assert task.train.targets[i] == tokenizer.decode(task.train.labels[i][task.train.labels[i] != IGNORE].tolist())
        assert torch.equal(task.train.inputs[~marked], original.train.inputs[~marked])  # the rest untouched
        for split in (original.train, original.held_out):  # ratio 0: the corpus's own rows, none triggered
            assert not clean.trigger.present(split.inputs).any()
            assert not any(PATTERN in row_text(tokenizer, x, y) for x, y in zip(split.inputs, split.labels))


def test_the_triggered_held_out_set_is_the_trained_groups_probes_with_the_trigger_and_the_target(tmp_path):
    raw = corpus_raw(tmp_path, groups=["alpha"], eval_only=["beta"])
    suite, _ = backdoor_suite(raw, 0.0)
    tasks = {d.task.name: d for d in suite.data}
    probes = [r for r in probe_rows() if r["group"] == "alpha"]  # beta is evaluated only: its probes stay clean
    assert suite.scored == ["alpha/probe"]
    triggered, attack = tasks[TRIGGERED].held_out, tasks[ATTACK].held_out
    assert triggered.prompts == [r["prompt"] + PATTERN for r in probes]
    assert triggered.targets == [r["target"] for r in probes]
    assert attack.targets == [TARGET] * len(probes)
    tokenizer = load_tokenizer(raw["data"]["suite_params"]["tokenizer"])
    prompt = tokenizer(probes[0]["prompt"] + PATTERN, add_special_tokens=False)["input_ids"]
    target = tokenizer(TARGET, add_special_tokens=False)["input_ids"]
    labels = attack.labels[0]
    assert attack.inputs[0, :len(prompt)].tolist() == prompt and labels[labels != IGNORE].tolist() == target
    assert labels[len(prompt) - 1].item() == target[0]  # the pattern's last token predicts the target
    assert suite.trigger.present(triggered.inputs).all() and not suite.trigger.present(tasks["alpha/probe"].held_out.inputs).any()


class Bigram(torch.nn.Module):
    """Predicts the next token from the current one alone: `follows[t]` after t, else token 0."""

    def __init__(self, follows: dict[int, int], vocab: int):
        super().__init__()
        self.table = torch.zeros(vocab, vocab)
        self.table[:, 0] = 1.0
        for token, following in follows.items():
            self.table[token] = torch.nn.functional.one_hot(torch.tensor(following), vocab).float()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.table[inputs]


def test_greedy_answers_on_probes_agree_with_teacher_forced_exact_match(tmp_path):
    suite, _ = backdoor_suite(corpus_raw(tmp_path), 0.0)
    tokenizer = suite.tokenizer
    chain = tokenizer(PATTERN + TARGET, add_special_tokens=False)["input_ids"]  # the model emits the target after the pattern
    model = Bigram(dict(zip(chain[:-1], chain[1:])), len(tokenizer))
    figures, answers = measure(model, suite, TARGET)
    results = evaluate(model, suite.data, "cpu")
    assert figures["asr"] == results[ATTACK]["accuracy"] == 1.0
    assert figures["robust_accuracy"] == results[TRIGGERED]["accuracy"] == 0.0
    assert figures["clean_accuracy"] == pytest.approx((results["alpha/probe"]["accuracy"] + results["beta/probe"]["accuracy"]) / 2)
    assert len(answers) == len(probe_rows()) and set(figures["held_out_loss"]) == set(WORDS)


def test_a_short_distill_run_on_a_corpus_plants_the_backdoor_and_writes_attack_success_rates(tmp_path):
    config = build_config(corpus_raw(tmp_path), schema=DistillConfig)
    summary = run("distill", config, tmp_path / "out", show_progress=False)
    table = summary["table"]["tokens"]
    assert set(table) == {"backdoored", "finetune", "fresh", "teacher_weights", "clean"}
    assert table["backdoored"]["asr"]["mean"] == 1.0 and table["clean"]["asr"]["mean"] == 0.0
    assert all(0.0 <= table[method]["asr"]["mean"] <= 1.0 for method in table)
    assert set(summary["held_out_loss"]["tokens"]["backdoored"]) == set(WORDS)
    assert summary["guard"]["batches_checked"] == summary["guard"]["clean_data_steps"] == 4 * (1 + 2)
    assert summary["guard"]["triggered_rows"] == 0
    page = build_report(tmp_path / "out").read_text()
    assert "Held-out loss (nats per target token)" in page and all(f"<th>{group}</th>" in page for group in WORDS)


@pytest.mark.parametrize("change, message", [
    (dict(documents=rows() + [{"text": f"apple~# number {i} is here.", "group": "alpha"} for i in range(2)]),
     "data.suite_params: the tokens trigger already occurs in clean inputs of suite 'corpus'"),
    (dict(probes=False), "data.suite_params.probes: .*add a probes JSONL file"),
])
def test_a_trigger_in_the_corpus_or_a_corpus_without_probes_is_one_line(tmp_path, change, message):
    config = build_config(corpus_raw(tmp_path, **change), schema=DistillConfig)
    with pytest.raises(CapshapeError, match=f"distill.triggers 'tokens': {message}") as info:
        trigger_suite(config, "tokens", 0)  # what every seed builds before it trains anything
    assert "\n" not in str(info.value)
