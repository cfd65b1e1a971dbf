from pathlib import Path

import pytest

from capshape.config import RunConfig, build_config, load_config, parse_override
from capshape.errors import CapshapeError
from capshape.experiments.distill import DistillConfig, check_distill_config
from capshape.experiments.overhang import OverhangConfig, check_overhang_config
from capshape.experiments.transfer import TransferConfig, check_transfer_config
from capshape.experiments.unlearn import UnlearnConfig, check_unlearn_config
from capshape.train import check_config

SHIPPED = sorted(Path(__file__).parents[1].glob("configs/*.toml")) + sorted(
    Path(__file__).parents[1].glob("capshape/configs/*.toml"))


# Protocol configs extend RunConfig with their own section: file name -> (schema, semantic check).
PROTOCOL_CONFIGS = {"transfer.toml": (TransferConfig, check_transfer_config),
                    "unlearn.toml": (UnlearnConfig, check_unlearn_config),
                    "distill_digits.toml": (DistillConfig, check_distill_config),
                    "distill_sequence.toml": (DistillConfig, check_distill_config),
                    "overhang.toml": (OverhangConfig, check_overhang_config)}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    schema, check = PROTOCOL_CONFIGS.get(path.name, (RunConfig, check_config))
    check(load_config(path, schema=schema))


@pytest.mark.parametrize("name", ["demo.toml", "demo_sparse_parity.toml"])
def test_demo_configs_are_shipped_twice_identically(name):
    root = Path(__file__).parents[1]
    assert (root / "configs" / name).read_text() == (root / "capshape/configs" / name).read_text()


def test_shipped_comparisons_run_three_seeds():
    for path in SHIPPED:
        config = load_config(path, schema=PROTOCOL_CONFIGS.get(path.name, (RunConfig,))[0])
        if path.name not in PROTOCOL_CONFIGS and len(config.objectives) > 1:
            assert len(config.seeds) >= 3, path.name


@pytest.mark.parametrize("override, field", [
    ("train.lr=-1", "'train.lr'"), ("train.lrr=1", "'train.lrr' is not known"), ("model.n_head=3", "'model'"),
    ("data.mixture=\"zip\"", "'data.mixture'"), ("seeds=[]", "'seeds'"), ("train.steps=0", "'train.steps'"),
    ("data.zipf_exponent=-2", "'data.zipf_exponent'"),
])
def test_invalid_fields_are_named_in_one_line(override, field):
    with pytest.raises(CapshapeError, match=field) as info:
        build_config({}, [override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("raw, message", [
    ({"data": {"tasks": ["addd"]}}, "Did you mean 'add'"),
    ({"objectives": ["grupd"]}, "Unknown objective 'grupd'"),
    ({"objectives": ["mean"], "objective": {"grouped": {"p": 2}}}, "objective.grouped"),
    ({"data": {"tasks": ["add", "add"]}}, "listed twice"),
    ({"data": {"jsonl": ["/nonexistent.jsonl"]}}, "does not exist"),
    ({"data": {"mixture": "explicit", "tasks": ["add"], "weights": {"copy": 1}}}, "data.weights"),
])
def test_semantic_errors_are_caught_before_training(raw, message):
    with pytest.raises(CapshapeError, match=message):
        check_config(build_config(raw))


def test_overrides_parse_toml_values():
    assert parse_override("train.lr=3e-4") == (["train", "lr"], 3e-4)
    assert parse_override("data.tasks=[\"add\"]") == (["data", "tasks"], ["add"])
    assert parse_override("name=hello world") == (["name"], "hello world")
    config = build_config({"train": {"steps": 5}}, ["train.steps=7", "seeds=[1,2]"])
    assert config.train.steps == 7 and config.seeds == [1, 2]
    with pytest.raises(CapshapeError, match="key=value"):
        parse_override("train.steps")


def test_malformed_and_missing_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3")
    with pytest.raises(CapshapeError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(CapshapeError, match="does not exist"):
        load_config(tmp_path / "missing.toml")


def test_overrides_leave_the_callers_dict_alone():
    raw = {"train": {"steps": 5}}
    build_config(raw, ["train.steps=9"])
    assert raw == {"train": {"steps": 5}}
