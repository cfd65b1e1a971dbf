from pathlib import Path

import pytest

from capshape.config import build_config, load_config, parse_override
from capshape.errors import CapshapeError
from capshape.experiments import PROTOCOLS, get_protocol
from capshape.train import check_config

SHIPPED = sorted(Path(__file__).parents[1].glob("configs/*.toml")) + sorted(
    Path(__file__).parents[1].glob("capshape/configs/*.toml"))


def protocol_of(path: Path):
    """A protocol's config holds a section named after it ([transfer], [unlearn], ...); else: compare."""
    text = path.read_text()
    return get_protocol(next((name for name in PROTOCOLS if f"[{name}]" in text or f"[{name}." in text), "compare"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    protocol = protocol_of(path)
    protocol.check(load_config(path, schema=protocol.schema))


@pytest.mark.parametrize("name", ["demo.toml", "demo_sparse_parity.toml"])
def test_demo_configs_are_shipped_twice_identically(name):
    root = Path(__file__).parents[1]
    assert (root / "configs" / name).read_text() == (root / "capshape/configs" / name).read_text()


def test_shipped_comparisons_run_three_seeds():
    for path in SHIPPED:
        protocol = protocol_of(path)
        config = load_config(path, schema=protocol.schema)
        if protocol.name == "compare" and len(config.objectives) > 1:
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
