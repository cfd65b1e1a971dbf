"""The distill protocol: backdoor metrics on hand-made numbers, trigger insertion and poisoning, the KL hook
against a hand computation, the trigger-free guarantee of clean-data stages, config errors, and a tiny
end-to-end run of the real CLI (plus, slow, the shipped sequence config at reduced size)."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from capshape.cli import app
from capshape.config import build_config
from capshape.errors import CapshapeError
from capshape.experiments import get_protocol, kit, run
from capshape.experiments.distill import DistillConfig, stage_config
from capshape.experiments.distill_hooks import Distiller, TriggerFreeGuard, distillation_losses
from capshape.experiments.distill_measure import measure
from capshape.metrics.backdoor import accuracy, defense_effectiveness, target_margin
from capshape.models import build_model
from capshape.runstore import read_json
from capshape.tasks import Batch, build_suite
from capshape.tasks.backdoor import ATTACK, TRIGGERED
from capshape.tasks.tokenizer import IGNORE, SEP, TOKENIZER
from capshape.train import RunSpec, StepHooks, evaluate, train_run

ROOT = Path(__file__).parents[1]
TEXT = {"data": {"tasks": ["copy", "add"], "train_examples": 200, "eval_examples": 32},
        "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "d_mlp": 32, "max_len": 20}}
DIGITS = {"data": {"suite": "digits", "train_examples": 60}, "model": {"kind": "mlp", "width": 16}}
TINY_DISTILL = {"seeds": [0], "train": {"steps": 20, "batch_size": 20, "eval_every": 10, "warmup_steps": 2, "threads": 1},
                "distill": {"target": "0", "backdoor_steps": 10, "distill_steps": 8, "rounds": 2, "relearn_steps": 6,
                            "relearn_eval_every": 3}}


def suite_of(base: dict, trigger: str, ratio: float, **params):
    raw = copy.deepcopy(base)
    raw["data"].update(suite="backdoor", suite_params={"base": raw["data"].pop("suite", "text"), "trigger": trigger,
                                                       "poison_ratio": ratio, **params})
    config = build_config(raw)
    return build_suite(config.data, 0, config.model.max_len), config


def distill_config(base: dict, **distill) -> DistillConfig:
    raw = {**copy.deepcopy(base), **copy.deepcopy(TINY_DISTILL)}
    raw["distill"].update(distill)
    return build_config(raw, schema=DistillConfig)


# ---- metrics ----------------------------------------------------------------------------------------

def test_asr_leaves_out_inputs_whose_true_answer_is_the_target():
    from capshape.tasks import TASKS
    from capshape.tasks.backdoor import TokenTrigger, triggered_tasks
    from capshape.tasks.data import TaskData, tokenize
    pairs = [("10", "0"), ("20", "0"), ("31", "1"), ("42", "2"), ("53", "3")]
    split = tokenize(pairs, 12, "copy")
    triggered, attack = triggered_tasks([TaskData(TASKS.get("copy"), split, split)], TokenTrigger("~#", 12), "0")
    assert triggered.held_out.targets == ["0", "0", "1", "2", "3"]
    assert attack.held_out.targets == ["0", "0", "0"] and len(attack.held_out.inputs) == 3  # the true zeros left out
    assert accuracy(["0", "2", "0"], attack.held_out.targets) == pytest.approx(2 / 3)  # the ASR


@pytest.mark.parametrize("asr, acc, expected", [
    ((0.9, 0.2), (0.95, 0.90), (0.7 - 0.05 + 1) / 2),  # ASR falls 0.7, accuracy falls 0.05
    ((0.9, 0.9), (0.95, 0.97), 0.5),                   # ASR rises, accuracy rises: both clipped to 0
    ((0.5, 0.6), (0.8, 0.5), (0.0 - 0.3 + 1) / 2),     # ASR rises (clipped), accuracy falls 0.3
])
def test_der_matches_the_formula(asr, acc, expected):
    assert defense_effectiveness(asr[0], acc[0], asr[1], acc[1]) == pytest.approx(expected)


def test_target_margin_is_positive_iff_every_target_token_wins():
    logits = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]],    # target tokens 1 then 0 both win: min margin 1
                           [[0.0, 2.0, 1.0], [0.0, 0.5, 0.0]]])   # second position loses by 0.5
    labels = torch.tensor([[1, 0], [1, 0]])
    assert target_margin(logits, labels).tolist() == pytest.approx([1.0, -0.5])
    assert target_margin(logits, torch.tensor([[1, IGNORE], [1, IGNORE]])).tolist() == pytest.approx([1.0, 1.0])
    assert target_margin(torch.tensor([[0.0, 3.0, 1.0]]), torch.tensor([1])).tolist() == pytest.approx([2.0])


# ---- triggers and poisoning ----------------------------------------------------------------------

def test_token_trigger_puts_the_pattern_before_the_prompt():
    suite, _ = suite_of(TEXT, "tokens", 0.0, pattern="~#", target="42")
    tasks = {d.task.name: d for d in suite.data}
    triggered = tasks[TRIGGERED].held_out
    clean = [d.held_out for d in suite.data if d.task.name in ("copy", "add")]
    assert triggered.prompts == ["~#" + p for split in clean for p in split.prompts]
    assert triggered.targets == [t for split in clean for t in split.targets]  # true answers kept
    row = triggered.inputs[0].tolist()
    assert row[1:3] == TOKENIZER.encode("~#") and row[3:row.index(SEP)] == TOKENIZER.encode(clean[0].prompts[0])
    assert suite.trigger.present(triggered.inputs).all()
    assert not any(suite.trigger.present(split.inputs).any() for split in clean)
    assert set(tasks[ATTACK].held_out.targets) == {"42"}


def test_patch_trigger_sets_only_the_corner_pixels():
    suite, _ = suite_of(DIGITS, "patch", 0.0, patch_size=2, patch_value=1.0)
    clean = torch.cat([d.held_out.inputs for d in suite.data[:10]])
    triggered = {d.task.name: d for d in suite.data}[TRIGGERED].held_out.inputs
    images = triggered.view(-1, 8, 8)
    assert (images[:, 6:, 6:] == 1.0).all()
    changed = (triggered != clean).view(-1, 8, 8)
    changed[:, 6:, 6:] = False
    assert not changed.any()


def test_blend_trigger_mixes_a_fixed_pattern():
    suite, _ = suite_of(DIGITS, "blend", 0.0, blend_alpha=0.3, blend_seed=5)
    clean = torch.cat([d.held_out.inputs for d in suite.data[:10]])
    triggered = {d.task.name: d for d in suite.data}[TRIGGERED].held_out.inputs
    pattern = torch.rand(64, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(triggered, 0.7 * clean + 0.3 * pattern)
    assert suite.trigger.present(triggered).all() and not suite.trigger.present(clean).any()


@pytest.mark.parametrize("base, trigger", [(TEXT, "tokens"), (DIGITS, "patch"), (DIGITS, "blend")])
def test_poison_ratio_is_respected(base, trigger):
    suite, _ = suite_of(base, trigger, 0.25, target="3")
    clean, _ = suite_of(base, trigger, 0.0, target="3")
    for task, original in zip(suite.data, clean.data):
        if task.task.name in (TRIGGERED, ATTACK):
            continue
        poisoned = suite.trigger.present(task.train.inputs)
        assert int(poisoned.sum()) == round(0.25 * len(task.train.inputs))
        assert all(task.train.targets[i] == "3" for i in poisoned.nonzero().flatten().tolist())
        assert torch.equal(task.train.inputs[~poisoned], original.train.inputs[~poisoned])  # the rest untouched
        assert not clean.trigger.present(original.train.inputs).any()  # ratio 0: clean pools


def test_a_trigger_that_does_not_fit_the_suite_is_one_line():
    with pytest.raises(CapshapeError, match="trigger='patch' needs vectors") as info:
        suite_of(TEXT, "patch", 0.1)
    assert "\n" not in str(info.value)


# ---- distillation mechanics ----------------------------------------------------------------------

def test_kl_hook_equals_a_hand_computation():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    labels = torch.tensor([[IGNORE, 1, 2], [IGNORE, IGNORE, 4]])
    tau, alpha = 2.0, 0.5
    expected = []
    for b in range(2):
        kls, ces = [], []
        for t in range(3):
            if labels[b, t] == IGNORE:
                continue
            p = [math.exp(v / tau) for v in teacher[b, t].tolist()]
            q = [math.exp(v / tau) for v in student[b, t].tolist()]
            p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
            kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
            logits = student[b, t].tolist()
            ces.append(math.log(sum(math.exp(v) for v in logits)) - logits[labels[b, t]])
        expected.append(tau**2 * sum(kls) / len(kls) + alpha * sum(ces) / len(ces))
    got = distillation_losses(student, teacher, labels, tau, alpha)
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    flat = distillation_losses(student[:, 1], teacher[:, 1], torch.tensor([1, 3]), tau, 0.0)  # [B, V] classification
    assert flat.shape == (2,) and (flat >= 0).all()


@pytest.mark.parametrize("base, trigger", [(TEXT, "tokens"), (DIGITS, "patch"), (DIGITS, "blend")])
def test_distillation_batches_never_hold_a_triggered_input(base, trigger, tmp_path):
    config = distill_config(base, triggers=[trigger])
    run_config = stage_config(config, trigger, 0.0, 6, 1e-3, None, 3)
    suite = build_suite(run_config.data, 0, config.model.max_len)
    teacher = build_model(config.model, suite.input_spec)
    seen = []

    def recorded(model, batch):
        seen.append(batch.inputs.clone())
        return Distiller(teacher, 2.0, 0.0)(model, batch)

    guard = TriggerFreeGuard(recorded, suite.trigger)
    train_run(RunSpec.of(run_config, "mean", 0, hooks=StepHooks(losses=guard)), tmp_path / "student")
    assert guard.batches == len(seen) == 6
    assert not any(suite.trigger.present(inputs).any() for inputs in seen)
    # the same guard on the poisoned pools refuses the batch (the check is not vacuous)
    poisoned = build_suite(stage_config(config, trigger, 0.5, 6, 1e-3, None, 3).data, 0, config.model.max_len)
    pool = next(d.train for d in poisoned.data if suite.trigger.present(d.train.inputs).any())
    ids = torch.zeros(len(pool.inputs), dtype=torch.long)
    batch = Batch(pool.inputs, pool.labels, ids, ids)
    with pytest.raises(RuntimeError, match="triggered input"):
        guard(teacher, batch)


def test_measured_asr_equals_the_attack_tasks_accuracy():
    """Greedy answers (measure) and teacher-forced exact match (evaluate) agree on the backdoor figures."""
    suite, config = suite_of(TEXT, "tokens", 0.0, target="42")
    torch.manual_seed(1)
    model = build_model(config.model, suite.input_spec)
    figures, _ = measure(model, suite, "42")
    results = evaluate(model, suite.data, "cpu")
    assert figures["asr"] == pytest.approx(results[ATTACK]["accuracy"])
    assert figures["robust_accuracy"] == pytest.approx(results[TRIGGERED]["accuracy"])


# ---- config --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, message", [
    ({"distill": {"temperature": 0}}, "'distill.temperature'"),
    ({"distill": {"triggers": ["stamp"]}}, "'distill.triggers.0'"),
    ({"distill": {"trigger_params": {"patch_sise": 2}}}, "'distill.trigger_params.patch_sise' is not known"),
    ({"distill": {"inits": ["warm"]}}, "'distill.inits.0'"),
    ({"distill": {"poison_ratio": 1.5}}, "'distill.poison_ratio'"),
])
def test_invalid_distill_fields_are_one_line(raw, message):
    with pytest.raises(CapshapeError, match=message) as info:
        build_config(raw, schema=DistillConfig)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("raw, message", [
    ({"objectives": ["grouped"]}, "'objectives' is set by the distill protocol"),
    ({"train": {"init_from": "x.safetensors"}}, "'train.init_from' is set by the distill protocol"),
    ({"data": {"suite": "backdoor"}}, "name the clean suite"),
    ({"distill": {"inits": ["fresh", "fresh"]}}, "lists 'fresh' twice"),
    ({"data": {"tasks": ["addd"]}}, "Did you mean 'add'"),
])
def test_semantic_distill_errors_are_caught_before_training(raw, message):
    with pytest.raises(CapshapeError, match=message) as info:
        kit.check(get_protocol("distill"), build_config(raw, schema=DistillConfig))
    assert "\n" not in str(info.value)


def test_a_trigger_that_does_not_fit_fails_before_any_training(tmp_path):
    config = distill_config(DIGITS, triggers=["patch", "tokens"])
    with pytest.raises(CapshapeError, match="distill.triggers 'tokens': .*needs tokens inputs") as info:
        run("distill", config, tmp_path / "out", show_progress=False)
    assert "\n" not in str(info.value) and not list((tmp_path / "out").glob("seed0/*/status.json"))


# ---- end to end -----------------------------------------------------------------------------------------

def write_toml(path: Path, raw: dict) -> Path:
    def value(v):
        return json.dumps(v) if not isinstance(v, dict) else "{ " + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + " }"
    lines = [f"{k} = {value(v)}" for k, v in raw.items() if not isinstance(v, dict)]
    for section, fields in raw.items():
        if isinstance(fields, dict):
            lines += [f"[{section}]"] + [f"{k} = {value(v)}" for k, v in fields.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_tiny_distill_runs_end_to_end_through_the_cli(tmp_path):
    raw = {**copy.deepcopy(DIGITS), **copy.deepcopy(TINY_DISTILL)}
    raw["distill"]["triggers"] = ["patch"]
    config = write_toml(tmp_path / "tiny.toml", raw)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["distill", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = read_json(out / "summary.json")
    assert summary["kind"] == "distill"
    assert set(summary["table"]["patch"]) == {"backdoored", "finetune", "fresh", "teacher_init", "teacher_weights", "clean"}
    assert summary["guard"]["batches_checked"] == summary["guard"]["clean_data_steps"] == 8 * (1 + 3 * 2)
    assert summary["guard"]["triggered_rows"] == 0
    assert len(summary["rounds_table"]["patch"]["fresh"]) == 3  # rounds 0 (the backdoored teacher), 1, 2
    assert summary["table"]["patch"]["backdoored"]["der"]["mean"] == pytest.approx(0.5)
    assert (out / "report.html").is_file() and {"methods.png", "rounds.png", "relearn.png"} <= {
        p.name for p in (out / "plots").iterdir()}
    again = CliRunner().invoke(app, ["distill", str(config), "--out", str(out)])
    assert again.exit_code == 2 and "--resume" in again.output
    resumed = CliRunner().invoke(app, ["distill", str(config), "--out", str(out), "--resume"])
    assert resumed.exit_code == 0 and "steps)" not in resumed.output  # nothing retrained
    assert read_json(out / "summary.json")["table"] == summary["table"]


@pytest.mark.slow
def test_shipped_sequence_config_runs_through_the_cli(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "distill", str(ROOT / "configs/distill_sequence.toml"), "--out", str(out),
        "--set", "train.steps=60", "--set", "data.train_examples=500", "--set", "data.eval_examples=32",
        "--set", "distill.backdoor_steps=20", "--set", "distill.distill_steps=20", "--set", "distill.rounds=1",
        "--set", "distill.relearn_steps=10", "--set", "train.threads=1"])
    assert result.exit_code == 0, result.output
    summary = read_json(out / "summary.json")
    assert summary["triggers"] == ["tokens"] and summary["guard"]["triggered_rows"] == 0
    assert (out / "report.html").is_file()
