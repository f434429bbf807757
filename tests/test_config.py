"""Config validation: every class of user error names its key; overrides and docs."""

import re
from pathlib import Path

import pytest
import yaml

from flip_fl.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_reference_markdown,
    load_config,
    parse_override,
)
from flip_fl.config.loading import set_key_path
from flip_fl.config.renamed import RENAMED
from tests.tiny import tiny_config


def error_of(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        tiny_config(*overrides)
    return str(info.value)


def test_defaults_load():
    cfg = tiny_config()
    assert cfg.federation.num_clients == 6 and cfg.server.lr == 1.0 and cfg.attack.num_malicious == 0


def test_unknown_key_suggests_the_close_one():
    expected = "federation.num_client: unknown key; did you mean 'num_clients'?"
    assert error_of("federation.num_client=3").startswith(expected)
    assert "unknown key" in error_of("nonsense.x=1")


@pytest.mark.parametrize("override, key, words", [
    ("federation.num_rounds=2.5", "federation.num_rounds", "expected an integer"),
    ("training.lr=fast", "training.lr", "expected a number"),
    ("data.download=1", "data.download", "expected true or false"),
    ("data.name=imagenet", "data.name", "unknown dataset"),
    ("attack.malicious_ids=3", "attack.malicious_ids", "expected"),
])
def test_wrong_types(override, key, words):
    message = error_of(override)
    assert message.startswith(key) and words in message


@pytest.mark.parametrize("override, key", [
    ("training.lr=0", "training.lr"), ("training.momentum=1.0", "training.momentum"),
    ("federation.num_clients=0", "federation.num_clients"), ("defense.threshold=1.5", "defense.threshold"),
])
def test_out_of_range(override, key):
    message = error_of(override)
    assert message.startswith(key) and "out of range" in message


@pytest.mark.parametrize("overrides, key", [
    (["federation.clients_per_round=7"], "federation.clients_per_round"),
    (["attack.num_malicious=7"], "attack.num_malicious"),
    (["data.partition=dirichlet"], "data.alpha"),
    (["data.alpha=0.5"], "data.alpha"),
    (["attack.malicious_ids=[0, 9]"], "attack.malicious_ids"),
    (["attack.malicious_ids=[1, 1]"], "attack.malicious_ids"),
    (["attack.num_malicious=2", "attack.malicious_ids=[1]"], "attack.num_malicious"),
    (["attack.target_label=10"], "attack.target_label"),
    (["attack.num_malicious=2", "attack.rounds=[1]"], "attack.rounds"),
    (["attack.num_malicious=1", "attack.rounds=[9]"], "attack.rounds[0]"),
    (["attack.start_round=3", "attack.end_round=2"], "attack.end_round"),
    (["model.width=0.5"], "model.width"),
    (["attack.num_malicious=5"], "attack.force_sampled"),
])
def test_impossible_combinations(overrides, key):
    assert error_of(*overrides).startswith(key)


def test_override_values_parse_as_yaml():
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert apply_overrides({"a": {"b": 1}}, ["a.c=true"]) == {"a": {"b": 1, "c": True}}
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


def test_file_errors_name_the_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_every_shipped_config_is_valid():
    for path in sorted(Path("configs").glob("*.yaml")):
        load_config(path)


def test_config_reference_is_current():
    assert Path("docs/CONFIG.md").read_text() == config_reference_markdown(), \
        "docs/CONFIG.md is stale: run `python sim.py config-docs > docs/CONFIG.md`"


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_an_old_key_is_one_line_naming_its_new_place(old):
    raw: dict = {}
    set_key_path(raw, old if "." in old else f"{old}.x", 1, "test")
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert str(err.value) == f"{old}: renamed to {RENAMED[old]} in flip-fl 0.2 (docs/CONFIG.md)"


def test_shipped_configs_and_docs_use_the_new_names():
    files = [*Path("docs").glob("*.md"), Path("README.md"), *Path("configs").rglob("*.yaml")]
    dotted = [old for old in RENAMED if "." in old]
    for path in files:
        text = "\n".join(line for line in path.read_text().splitlines() if "renamed" not in line)
        used = [old for old in dotted if re.search(rf"(?<![\w.]){re.escape(old)}\b", text)]
        assert not used, f"{path} still names {used}"
    for path in Path("configs").rglob("*.yaml"):
        top = set(yaml.safe_load(path.read_text()))
        assert not top & {"client", "clients", "flip", "labels"}, path
