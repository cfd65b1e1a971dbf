"""Tests for capshape.report on a tiny synthetic comparison directory (2 tasks, 2 objectives, 2 seeds).

The run summaries and the comparison summary are made by the real producers (summarize_run,
aggregate), so the report is tested against the formats they actually write.
"""

import json
import math
import re

import pytest

from capshape.errors import CapshapeError
from capshape.experiments.compare import aggregate
from capshape.experiments import build_report
from capshape.report.plots import seed_band
from capshape.train.summary import summarize_run

TASKS = {"copy": "copy", "copy_twice": "composed"}  # task -> capability label
PARTS = {"copy_twice": ("copy", "copy")}
STEPS = [0, 50, 100, 150, 200]
OBJECTIVES = ["mean", "grouped"]
SEEDS = [0, 1]
SECTIONS_WITH_PLOTS = ["Per-task curves", "Group-loss spread", "Alignment tax", "Composition check", "Training loss"]


def accuracy(step: int, shift: float) -> float:
    return 1 / (1 + math.exp(-(step - 100 - shift) / 15))


def metric_rows(objective: str, seed: int) -> list[dict]:
    rows = []
    for step in STEPS:
        shift = 10 * seed + (20 if objective == "grouped" else 0)
        acc = {"copy": accuracy(step, shift), "copy_twice": accuracy(step, shift + 30) ** 2}
        row = {"step": step, "seconds": step / 100,
               "eval": {task: {"accuracy": a, "token_accuracy": (1 + a) / 2, "target_logprob": -5 * (1 - a),
                               "loss": 2.5 - 2 * a + 0.1 * seed} for task, a in acc.items()}}
        if step:
            row["train"] = {"loss": 3 - step / 100, "objective": 3 - step / 100, "grad_norm": 1.0, "lr": 1e-3}
        rows.append(row)
    return rows


def write_run(path, objective: str, seed: int) -> None:
    path.mkdir(parents=True)
    rows = metric_rows(objective, seed)
    summary = summarize_run(rows, TASKS, PARTS, {"copy": "copy", "copy_twice": "copy_twice"}, STEPS[-1])
    files = {"config.json": {"name": "tiny", "train": {"steps": STEPS[-1]}},
             "summary.json": {"objective": objective, "seed": seed, **summary},
             "status.json": {"status": "finished", "objective": objective, "seed": seed}}
    for name, content in files.items():
        (path / name).write_text(json.dumps(content))
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def comparison(tmp_path):
    specs = [(objective, seed) for objective in OBJECTIVES for seed in SEEDS]
    for objective, seed in specs:
        write_run(tmp_path / f"{objective}-seed{seed}", objective, seed)
    config = {"name": "tiny <cmp>", "seeds": SEEDS, "objectives": OBJECTIVES + ["group_dro"],
              "train": {"steps": STEPS[-1]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    summary = aggregate(tmp_path, specs + [("group_dro", 0)])  # group_dro-seed0 never finished
    summary["failed"] = {"group_dro-seed0": "loss became <nan>"}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return tmp_path


def sections(page: str) -> dict[str, str]:
    return {match.group(1): match.group(2) for match in re.finditer(r"<h2>(.*?)</h2>(.*?)(?=<h2>|</body>)", page, re.S)}


def test_comparison_report(comparison):
    report = build_report(comparison)
    assert report == comparison / "report.html"
    page = report.read_text()
    for title in SECTIONS_WITH_PLOTS:
        assert '<img src="data:image/png;base64,' in sections(page)[title], title
    assert "<table>" in sections(page)["Emergence metrics"]
    for name in [*TASKS, *OBJECTIVES]:
        assert name in page
    assert " ± " in page  # two seeds: mean ± std
    assert "alignment tax = final mean held-out loss" in page
    assert 'class="warning"' in page and "loss became &lt;nan&gt;" in page and "tiny &lt;cmp&gt;" in page
    pngs = sorted(p.name for p in (comparison / "plots").glob("*.png"))
    assert len(pngs) == page.count("data:image/png;base64,") == 7
    assert all((comparison / "plots" / name).read_bytes().startswith(b"\x89PNG") for name in pngs)


def test_single_run_report(comparison):
    run = comparison / "grouped-seed1"
    page = build_report(run).read_text()
    for title in SECTIONS_WITH_PLOTS:
        assert '<img src="data:image/png;base64,' in sections(page)[title], title
    assert "grouped" in page and all(task in page for task in TASKS)
    assert 'class="warning"' not in page and " ± " not in page


@pytest.mark.parametrize("make", [lambda p: p / "missing", lambda p: p])
def test_not_a_run_directory_raises(tmp_path, make):
    path = make(tmp_path)  # a missing directory, then an empty one
    with pytest.raises(CapshapeError, match=re.escape(str(path))):
        build_report(path)


def test_seed_band_uses_steps_measured_by_every_seed():
    steps, mean, low, high = seed_band([{0: 0.0, 10: 0.2, 20: 1.0}, {0: 0.2, 10: 0.4}])
    assert steps == [0, 10]
    assert list(mean) == pytest.approx([0.1, 0.3]) and list(low) == [0.0, 0.2] and list(high) == [0.2, 0.4]
