"""The emergence testbeds: multitask sparse parity, grokking, in-context vs in-weights learning,
the attention-only model, edit distance in evaluation and the grokking delay."""
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from capshape.cli import app
from capshape.config import ModelConfig, build_config
from capshape.errors import CapshapeError
from capshape.metrics import grokking_delay, step_reaching
from capshape.models import AttentionOnly, build_model
from capshape.tasks import FixedTask, InputSpec, TOKENIZER, build_task_data
from capshape.tasks.grokking import GrokkingParams, split_pairs
from capshape.tasks.icl import ICLParams, World, bursty, episodes
from capshape.tasks.sparse_parity import SparseParityParams, subtask_bits
from capshape.tasks.suites import SUITES
from capshape.tasks.tokenizer import IGNORE
from capshape.train import check_config, evaluate
from capshape.train.loop import prepare_data

CONFIGS = Path(__file__).parents[1] / "configs"
runner = CliRunner()


def parity_config(**data):
    return build_config({
        "data": {"suite": "sparse_parity", "suite_params": {"n_subtasks": 6, "n_bits": 10, "k": 3},
                 "train_examples": 300, "eval_examples": 40, "mixture": "zipf", "zipf_exponent": 1.4, **data},
        "model": {"kind": "mlp", "width": 16},
        "train": {"batch_size": 4000},
    })


# --- sparse parity ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stratify", [False, True])
def test_zipf_subtask_frequencies_follow_the_law(stratify):
    config = parity_config(stratify=stratify)
    sampler = prepare_data(config, 0).sampler(config, 0)
    K, B, batches = 6, config.train.batch_size, 10
    counts = sum(torch.bincount(sampler.sample().task_ids, minlength=K) for _ in range(batches)).double()
    zipf = torch.arange(1, K + 1, dtype=torch.float64) ** -1.4
    zipf /= zipf.sum()
    expected = (1 + (B - K) * zipf) / B if stratify else zipf  # stratified: one fixed slot per subtask
    torch.testing.assert_close(counts / (B * batches), expected, atol=0.006, rtol=0)


def test_parity_labels_are_the_parity_of_each_subtasks_bits():
    config = parity_config()
    data = prepare_data(config, 3).data
    subsets = subtask_bits(SparseParityParams(n_subtasks=6, n_bits=10, k=3), 3)
    assert len(set(subsets)) == 6 and all(len(s) == 3 for s in subsets)
    assert [d.task.name for d in data] == [f"parity_{i:02d}" for i in range(6)]
    for index, task_data in enumerate(data):
        for split in (task_data.train, task_data.held_out):
            code, bits = split.inputs[:, :6], split.inputs[:, 6:]
            assert split.inputs.shape[1] == 16 and split.labels.dtype == torch.long
            assert (code.argmax(1) == index).all() and (code.sum(1) == 1).all()
            assert set(bits.unique().tolist()) <= {0.0, 1.0}
            parity = bits[:, list(subsets[index])].sum(1).long() % 2
            assert torch.equal(split.labels, parity)
            assert split.targets == [str(label) for label in parity.tolist()]
        train_rows = {tuple(row) for row in task_data.train.inputs.tolist()}
        assert not train_rows & {tuple(row) for row in task_data.held_out.inputs.tolist()}


def test_sparse_parity_params_are_checked_before_training():
    with pytest.raises(CapshapeError, match="data.suite_params"):
        check_config(build_config({"data": {"suite": "sparse_parity", "suite_params": {"n_bits": 4, "k": 5}}}))
    with pytest.raises(CapshapeError, match="model.kind='mlp'"):
        config = parity_config()
        build_model(config.model.model_copy(update={"kind": "transformer"}), prepare_data(config, 0).suite.input_spec)


TINY_PARITY = [
    "--set", "data.suite_params={ n_subtasks = 4, n_bits = 8, k = 2 }", "--set", "data.train_examples=64",
    "--set", "data.eval_examples=16", "--set", "train.batch_size=16", "--set", "train.steps=4",
    "--set", "train.eval_every=2", "--set", "train.warmup_steps=1", "--set", "train.threads=1",
    "--set", "model.width=8",
]


def test_sparse_parity_runs_through_the_real_cli(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["run", str(CONFIGS / "sparse_parity.toml"), "--out", str(out), *TINY_PARITY])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["objectives"]) == {"mean", "grouped"}
    assert set(summary["objectives"]["grouped"]["tasks"]) == {"parity_00", "parity_01", "parity_02", "parity_03"}
    run = json.loads((out / "grouped-seed0" / "summary.json").read_text())
    extras = run["suite_metrics"]["sparse_parity"]
    assert set(extras["tasks"]) == set(run["tasks"]) and 0 <= extras["learned"] <= 4
    assert "edit_distance" not in run["tasks"]["parity_00"]["final_eval"]  # classification
    assert (out / "report.html").exists()


# --- grokking --------------------------------------------------------------------------------------

@pytest.mark.parametrize("operation", ["add", "sub", "mul", "square_sum", "cube_sum"])
def test_grokking_split_covers_every_pair_once(operation):
    params = GrokkingParams(p=11, train_fraction=0.3, operations=[operation])
    train, val = split_pairs(params, operation, 0)
    assert len(train) == round(0.3 * 121) and len(train) + len(val) == 121
    assert sorted((a, b) for a, b, _ in train + val) == [(a, b) for a in range(11) for b in range(11)]
    apply = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
             "square_sum": lambda a, b: a * a + b * b, "cube_sum": lambda a, b: a ** 3 + b ** 3}[operation]
    assert all(c == apply(a, b) % 11 for a, b, c in train + val)
    assert split_pairs(params, operation, 0) == (train, val) and split_pairs(params, operation, 1) != (train, val)


def test_grokking_symbols_one_token_per_residue_and_one_split_per_operation():
    config = build_config({"data": {"suite": "grokking", "group_by": "group",
                                    "suite_params": {"p": 13, "operations": ["add", "mul"]}}, "model": {"max_len": 4}})
    prepared = prepare_data(config, 0)
    names = [d.task.name for d in prepared.data]
    assert names == ["mod_add", "mod_add_train", "mod_mul", "mod_mul_train"]
    assert prepared.suite.trained == [True, False, True, False] and prepared.group_names == ["mod_add", "mod_mul"]
    assert prepared.suite.input_spec.vocab_size == 13 + 5 + 1  # residues, the five operation tokens, "="
    add, add_train, mul, _ = prepared.data
    assert add.train.inputs.shape == (round(0.5 * 169), 4) and len(add.held_out.inputs) == 169 - 84
    assert (add.train.labels[:, :3] == -100).all() and add.train.labels[:, 3].tolist() == [int(t) for t in add.train.targets]
    for row, (prompt, target) in zip(add.train.inputs.tolist(), zip(add.train.prompts, add.train.targets)):
        a, b = map(int, prompt.split("+"))
        assert row == [a, 13, b, 18] and int(target) == (a + b) % 13
    assert not set(add.train.prompts) & set(add.held_out.prompts)
    assert add_train.held_out.prompts == add.train.prompts  # training accuracy, measured on held_out
    assert [p.replace("*", "+") for p in mul.train.prompts] != add.train.prompts  # each operation its own split
    with pytest.raises(CapshapeError, match="model.max_len >= 4"):
        prepare_data(build_config({"data": {"suite": "grokking"}, "model": {"max_len": 3}}), 0)
    with pytest.raises(CapshapeError, match="model.max_len"):
        prepare_data(build_config({"data": {"suite": "grokking", "suite_params": {"format": "digits"}},
                                   "model": {"max_len": 6}}), 0)


def test_symbol_answers_are_scored_from_the_answer_token():
    config = build_config({"data": {"suite": "grokking", "suite_params": {"p": 7}}, "model": {"max_len": 4}})
    data = prepare_data(config, 0).data

    class Oracle(torch.nn.Module):  # logits whose argmax at the answer position is (a + b) mod 7
        def forward(self, tokens):
            logits = torch.zeros(*tokens.shape, 13)
            logits[:, -1].scatter_(1, ((tokens[:, 0] + tokens[:, 2]) % 7)[:, None], 5.0)
            return logits

    results = evaluate(Oracle(), data, "cpu")
    assert results["mod_add"]["accuracy"] == 1.0 and results["mod_add_train"]["accuracy"] == 1.0


def test_grokking_summary_per_operation_and_for_the_suite():
    rows = [{"step": s, "eval": {"mod_add": {"accuracy": v}, "mod_add_train": {"accuracy": t},
                                  "mod_mul": {"accuracy": w}, "mod_mul_train": {"accuracy": u}}}
            for s, v, t, w, u in [(0, 0.0, 0.0, 0.0, 0.0), (100, 0.2, 1.0, 0.0, 0.5), (200, 1.0, 1.0, 0.3, 1.0),
                                  (300, 1.0, 1.0, 1.0, 1.0)]]
    grokking = SUITES.get("grokking").summary_extras(rows)["grokking"]
    assert grokking["operations"]["mod_add"] == {"train_step": 100, "val_step": 200, "delay": 100, "ratio": 2.0}
    assert grokking["operations"]["mod_mul"] == {"train_step": 200, "val_step": 300, "delay": 100, "ratio": 1.5}
    assert (grokking["train_step"], grokking["val_step"], grokking["delay"]) == (200, 300, 100)


def test_grokking_delay_on_hand_made_curves():
    steps = [0, 100, 200, 300, 400]
    train = [0.1, 0.5, 0.995, 1.0, 1.0]
    val = [0.0, 0.1, 0.2, 0.6, 0.992]
    assert step_reaching(steps, train, 0.99) == 200 and step_reaching(steps, val, 0.99) == 400
    assert grokking_delay(steps, train, val) == 200
    assert grokking_delay(steps, train, val, level=0.5) == 300 - 100
    assert grokking_delay(steps, train, [0.0, 0.1, 0.2, 0.3, 0.4]) is None  # never generalises
    assert grokking_delay(steps, [0.5] * 5, val) is None
    assert grokking_delay(steps, val, val) == 0


# --- in-context vs in-weights ---------------------------------------------------------------------

ICL = ICLParams(n_classes=20, n_labels=6, dim=7, context=8, burstiness=4, p_bursty=0.9, class_zipf_exponent=1.0)


def _world(params=ICL):
    return World.make(params, torch.Generator().manual_seed(0))


def _query_count(classes):
    return (classes[:, :-1] == classes[:, -1:]).sum(1)


@pytest.mark.parametrize("burstiness", [1, 2, 4, 8])
def test_bursty_sequences_hold_the_query_class_exactly_b_times(burstiness):
    params = ICL.model_copy(update={"burstiness": burstiness})
    classes, slots = bursty(500, params, _world(params).class_weights, torch.Generator().manual_seed(1))
    assert classes.shape == (500, 9)
    assert (_query_count(classes) == burstiness).all()
    for row in classes[:, :-1].tolist():  # N/B distinct classes, each exactly B times
        assert sorted(row.count(c) for c in set(row)) == [burstiness] * (8 // burstiness)
    only_bursty = params.model_copy(update={"p_bursty": 1.0})
    train = episodes("train", 300, only_bursty, _world(params), torch.Generator().manual_seed(2))
    assert (_query_count(train.classes) == burstiness).all()


def test_training_mixture_has_bursty_and_iid_sequences_with_fixed_labels():
    world = _world()
    train = episodes("train", 4000, ICL, world, torch.Generator().manual_seed(0))
    assert (train.classes < ICL.n_classes).all()
    assert torch.equal(train.labels, world.class_labels[train.classes])
    bursty_share = float((_query_count(train.classes) == 4).double().mean())
    assert 0.88 < bursty_share < 0.95  # 0.9 bursty, plus the rare i.i.d. sequence with exactly 4 copies


def test_in_context_eval_uses_novel_classes_with_labels_given_in_context():
    world = _world()
    generator = torch.Generator().manual_seed(0)
    train = episodes("train", 2000, ICL, world, generator)
    novel = episodes("in_context", 2000, ICL, world, generator)
    assert (novel.classes >= ICL.n_classes).all() and (novel.classes < 2 * ICL.n_classes).all()
    assert not set(novel.classes.flatten().tolist()) & set(train.classes.flatten().tolist())
    assert (_query_count(novel.classes) == ICL.burstiness).all()
    for classes, labels in zip(novel.classes.tolist(), novel.labels.tolist()):
        label_of = dict(zip(classes[:-1], labels[:-1]))
        assert all(label_of[c] == l for c, l in zip(classes, labels))  # one label per class, query included
        assert len(set(label_of.values())) == len(label_of)  # distinct labels, so the answer is unambiguous


def test_in_weights_eval_query_class_is_absent_from_context():
    world = _world()
    iwl = episodes("in_weights", 2000, ICL, world, torch.Generator().manual_seed(0))
    assert (_query_count(iwl.classes) == 0).all() and (iwl.classes < ICL.n_classes).all()
    assert torch.equal(iwl.labels, world.class_labels[iwl.classes])


def test_icl_suite_renders_items_with_context_labels_and_an_empty_query_slot():
    config = build_config({
        "data": {"suite": "icl", "suite_params": ICL.model_dump(), "train_examples": 64, "eval_examples": 32},
        "model": {"kind": "attention_only"},
    })
    prepared = prepare_data(config, 0)
    assert [d.task.name for d in prepared.data] == ["icl_train", "icl_in_context", "icl_in_weights"]
    assert prepared.suite.trained == [True, False, False]
    assert prepared.suite.input_spec == InputSpec("vector_sequences", d_in=7 + 6, n_classes=6)
    for task_data in prepared.data:
        split = task_data.held_out
        assert split.inputs.shape == (32, 9, 13) and split.labels.shape == (32,)
        assert (split.inputs[:, -1, 7:] == 0).all()  # the query's label slot is empty
        assert (split.inputs[:, :-1, 7:].sum(-1) == 1).all()  # one-hot labels on the context
        assert split.targets == [str(label) for label in split.labels.tolist()]
    model = build_model(config.model, prepared.suite.input_spec)
    assert model(prepared.data[0].held_out.inputs).shape == (32, 6)


# --- attention-only model ---------------------------------------------------------------------------

def _attention_only():
    torch.manual_seed(0)
    return AttentionOnly(ModelConfig(kind="attention_only", n_layer=2, n_head=2, d_model=16, d_mlp=24, max_len=10),
                         d_in=5, n_classes=3)


def test_attention_only_sites_shapes_and_last_position_readout():
    model = _attention_only()
    assert set(model.sites) == {"embed", "layers.0.attn.z", "layers.0.attn_out", "layers.0.resid_post", "layers.1.attn.z",
                                "layers.1.attn_out", "layers.1.resid_post", "readout.hidden"}
    assert not any("mlp" in name for name, _ in model.named_modules())
    x = torch.randn(4, 7, 5)
    seen = {}
    with model.attach({"layers.1.resid_post": lambda h: seen.setdefault("h", h)}):
        logits = model(x)
    assert logits.shape == (4, 3) and seen["h"].shape == (4, 7, 16)
    torch.testing.assert_close(logits, model.readout(model.ln_final(seen["h"][:, -1])))
    with pytest.raises(CapshapeError, match="max_len"):
        model(torch.randn(1, 11, 5))


def test_attention_only_is_causal():
    model = _attention_only()
    a = torch.randn(2, 8, 5)
    b = a.clone()
    b[:, 5:] += 1.0
    states = []
    with model.attach({"layers.1.resid_post": lambda h: states.append(h) or h}):
        model(a), model(b)
    torch.testing.assert_close(states[0][:, :5], states[1][:, :5])  # the past never sees the future
    assert not torch.allclose(states[0][:, 5:], states[1][:, 5:])


def test_build_model_matches_kind_and_input_spec():
    spec = InputSpec("vector_sequences", d_in=5, n_classes=3)
    assert isinstance(build_model(ModelConfig(kind="attention_only"), spec), AttentionOnly)
    with pytest.raises(CapshapeError, match="use model.kind='attention_only'"):
        build_model(ModelConfig(kind="mlp"), spec)


# --- edit distance in evaluation --------------------------------------------------------------------

class Oracle(torch.nn.Module):
    """Predicts the labels it is given, with the first target character replaced in `wrong` rows."""

    def __init__(self, labels: torch.Tensor, wrong: list[int]):
        super().__init__()
        logits = torch.nn.functional.one_hot(labels.clamp(min=0), TOKENIZER.vocab_size).float() * 10
        for row in wrong:
            first = int((labels[row] != IGNORE).nonzero()[0])
            logits[row, first] = torch.roll(logits[row, first], 1)
        self.logits = logits

    def forward(self, inputs):
        return self.logits[: len(inputs)]


def test_evaluate_reports_normalised_edit_distance_for_text_tasks():
    task = FixedTask("t", "g", "", None, None, examples=tuple((f"p{i}", target) for i, target in
                                                              enumerate(["abcd", "xy", "hello", "q"] * 2)))
    data = build_task_data(task, 4, 4, 0, 12)
    targets = data.held_out.targets
    result = evaluate(Oracle(data.held_out.labels, wrong=[0, 1]), [data], "cpu")["t"]
    expected = sum(1 / len(t) for t in targets[:2]) / len(targets)  # one substitution in each wrong row
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["edit_distance"] == pytest.approx(expected)
    assert evaluate(Oracle(data.held_out.labels, wrong=[]), [data], "cpu")["t"]["edit_distance"] == 0.0


# --- the real `capshape run` path on each shipped testbed config (slow) ------------------------------

def _run(tmp_path, config, *overrides):
    out = tmp_path / "out"
    args = ["run", str(CONFIGS / config), "--out", str(out), "--set", "train.steps=20", "--set", "train.eval_every=10",
            "--set", "train.threads=1"]
    for override in overrides:
        args += ["--set", override]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "report.html").exists()
    summary = json.loads((out / "summary.json").read_text())
    return summary, {run: json.loads((out / run / "summary.json").read_text()) for run in summary["runs"]}


@pytest.mark.slow
def test_sparse_parity_config_end_to_end(tmp_path):
    summary, runs = _run(tmp_path, "sparse_parity.toml", "data.train_examples=500", "train.batch_size=256")
    assert set(summary["objectives"]) == {"mean", "grouped"}
    assert len(runs["mean-seed0"]["suite_metrics"]["sparse_parity"]["tasks"]) == 32


@pytest.mark.slow
def test_grokking_config_end_to_end(tmp_path):
    summary, runs = _run(tmp_path, "grokking.toml", "data.suite_params.p=23", "train.batch_size=64")
    grokking = runs["mean-seed0"]["suite_metrics"]["grokking"]
    assert set(grokking) == {"level", "train_step", "val_step", "delay", "ratio", "operations"}
    assert set(runs["mean-seed0"]["tasks"]) == {"mod_add", "mod_add_train"}
    assert "edit_distance" in runs["mean-seed0"]["tasks"]["mod_add"]["final_eval"]


@pytest.mark.slow
def test_icl_config_end_to_end(tmp_path):
    summary, runs = _run(tmp_path, "icl.toml", "data.train_examples=500", "data.eval_examples=64")
    assert set(summary["objectives"]["mean"]["tasks"]) == {"icl_train", "icl_in_context", "icl_in_weights"}


def test_multi_operation_grokking_run_reports_operations_and_progress_measures(tmp_path):
    config = tmp_path / "grok.toml"
    config.write_text("""
seeds = [0, 1]
objectives = ["mean", "grouped"]
[data]
suite = "grokking"
suite_params = { p = 7, train_fraction = 0.5, operations = ["add", "mul"] }
group_by = "group"
[model]
n_layer = 1
n_head = 2
d_model = 16
d_mlp = 32
max_len = 4
[train]
steps = 20
batch_size = 16
lr = 0.01
eval_every = 10
threads = 1
""")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    run = json.loads((out / "grouped-seed0" / "summary.json").read_text())
    assert set(run["suite_metrics"]["grokking"]["operations"]) == {"mod_add", "mod_mul"}
    assert run["group_loss_spread"]["groups"] == ["mod_add", "mod_mul"]
    rows = [json.loads(line) for line in (out / "grouped-seed0" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["probes"]["weight_norm"] > 0 and 0 < row["probes"]["embedding_fourier_top5"] <= 1
    page = (out / "report.html").read_text()
    assert "<h2>Grokking per operation</h2>" in page and "<h2>Progress measures</h2>" in page
    grokking = page[page.index("<h2>Grokking per operation</h2>"):page.index("<h2>Progress measures</h2>")]
    assert grokking.count("<tr><td>mod_mul</td>") == 2  # one row per objective
