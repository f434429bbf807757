"""Properties every registered defense must have, parametrised over `DEFENSES.names`.

A new defense (one file in `strategies/`, registered with `@DEFENSES.register`) is tested here by being
registered, as torchvision's `test_extended_models.py` tests every registered model: its name builds its
class from a config, its `Params` agree with its constructor, round-trip through `--set` overrides and the
written config and are documented in docs/CONFIG.md; hostile replies are counted failures under it and
the global model stays finite; BatchNorm counters do not steer it; a round repeats exactly and its state
survives a checkpoint; and, unless it is listed in NOT_FILTERING with the reason, it rejects or
down-weights a planted outlier far from 9 clean updates. Each rule's own numbers are in
`tests/defenses/test_<name>.py`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import numpy as np
import pytest
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from flip_fl.config import ConfigError, config_reference_markdown, defense_params, from_yaml, to_yaml
from flip_fl.config.schema import params_class
from strategies import DEFENSES, Defense, SeededFedAvg, build_strategy
from strategies.factory import federation_options
from tests.defenses.rounds import (
    EXAMPLES,
    HOSTILE,
    NODE,
    P,
    aggregate,
    applied_delta,
    config,
    hostile_round,
    make_global,
    make_updates,
    reply,
    start_round,
    strategy,
    trained,
)
from tests.tiny import tiny_config

NAMES = DEFENSES.names

NOT_FILTERING = {
    "fedavg": "no defense: the (example-weighted) mean of every update",
    "foolsgold": "down-weights clients whose accumulated updates look alike (sybils, test_foolsgold.py); a lone "
                 "outlier looks like no one",
    "rlr": "reverses the server step on sign-disputed coordinates; every client keeps its weight (test_rlr.py)",
    "deepsight": "discards only clusters of updates labelled suspicious by their output-layer energy spread, which "
                 "is scale-invariant: a scaled copy of the clean direction is not suspicious, it is kept and "
                 "clipped to the median norm (a backdoor-like outlier is rejected: test_deepsight.py)",
    "fldetector": "flags clients whose updates disagree with their L-BFGS predictions over N rounds of history: a "
                  "round-1 outlier has none, and the median bounds it (detection: test_fldetector.py)",
    "flare": "soft trust: a client nobody votes for keeps exp(0) / sum exp(c / (tau mean c)), about 3.5% of the "
             "weight at 10 clients (test_flare.py)",
    "centered_clip": "clips each update's distance from the previous aggregate to tau and rejects no one: a lone "
                     "outlier still moves the aggregate by up to tau / n, with the official tau = 100 more than a "
                     "clean update's norm here (the bound: test_centered_clip.py)",
}
"""Defenses that do not reject or down-weight a lone outlier by design, and why."""

FILTERING = [name for name in NAMES if name not in NOT_FILTERING]


def params_fields(name: str) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(params_class(DEFENSES[name]))


PARAMS = [(name, field.name) for name in NAMES for field in params_fields(name)]


# --------------------------------------------------------------------------- registry and construction


def test_registry_matches_the_config_choices():
    assert set(DEFENSES) == set(DEFENSES.names) and len(DEFENSES) >= 13
    documented = set(re.findall(r"^\| `(\w+)` \|", Path("docs/DEFENSES.md").read_text(), re.MULTILINE))
    assert set(NAMES) <= documented, f"defenses without a row in docs/DEFENSES.md: {set(NAMES) - documented}"
    assert "fedavg" in NAMES and type(strategy("fedavg")).__name__ == "FedAvgDefense"
    row = next(line for line in config_reference_markdown().splitlines() if line.startswith("| `defense.name` |"))
    assert re.findall(r"'(\w+)'", row.split("|")[2]) == list(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_the_name_builds_its_class(name):
    cls = DEFENSES[name]
    assert issubclass(cls, SeededFedAvg) and cls.name == name and DEFENSES.lookup(name) is cls
    assert issubclass(cls, Defense) != (name == "fedavg")  # every defense but "no defense" is a `rule`
    strat = strategy(name)
    assert type(strat) is cls and type(strat).name == name


def test_an_unknown_name_is_a_config_error():
    with pytest.raises(ConfigError, match="defense.name: unknown defense 'trimmed'; choose one of alignins, bulyan, "):
        tiny_config("federation.num_clients=8", "federation.clients_per_round=7", "attack.num_malicious=1",
                    "defense.name=trimmed")


@pytest.mark.parametrize("name", NAMES)
def test_params_defaults_agree_with_the_constructor(name):
    """Where a Params key is also a keyword of `__init__` with a default, both defaults are the same."""
    cls = DEFENSES[name]
    signature = inspect.signature(cls.__init__).parameters
    for field in params_fields(name):
        assert field.metadata.get("doc"), f"defense.{name}.{field.name} has no documentation line (use `key`)"
        parameter = signature.get(field.name)
        if parameter is not None and parameter.default is not inspect.Parameter.empty:
            assert parameter.default == field.default, (name, field.name)


@pytest.mark.parametrize("name", NAMES)
def test_the_default_params_build_the_strategy(name):
    """`cls(**federation_options, **cls.options(Params(), cfg))`, the one way a config becomes a strategy."""
    cls = DEFENSES[name]
    cfg = config(name)
    cls.check(params_class(cls)(), cfg)
    options = cls.options(params_class(cls)(), cfg)
    assert isinstance(options, dict)
    strat = cls(**federation_options(cfg, {NODE + pid: pid for pid in range(8)}, {}), **options)
    assert isinstance(strat, cls) and strat.server_lr == cfg.server.lr
    assert cls.held_out(params_class(cls)(), cfg, 300) is None or name in ("fltrust", "flare")


# --------------------------------------------------------------------------- Params in the config


def other_value(name: str, field: dataclasses.Field) -> Any:
    """A valid value of `defense.<name>.<field>` other than its default."""
    hint = typing.get_type_hints(params_class(DEFENSES[name]))[field.name]
    args = get_args(hint) if get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    tp = next(a for a in args if a is not type(None))
    default, meta = field.default, field.metadata
    if get_origin(tp) is Literal:
        return next(choice for choice in get_args(tp) if choice != default)
    if meta.get("choices"):
        return next(choice for choice in meta["choices"] if choice != default)
    if tp is bool:
        return not default
    low = next((meta[b] for b in ("ge", "gt") if meta.get(b) is not None), 0)
    if tp is int:
        return max(int(low), 1) if default is None else default + 1
    if tp is float:
        return float(low) + 1.0 if default is None else (default / 2 if default else 1.0)
    if tp is str:
        return f"{default}_other"
    raise AssertionError(f"defense.{name}.{field.name}: no test value for type {hint}")


@pytest.mark.parametrize("name, key", PARAMS)
def test_params_round_trip_through_overrides_and_the_written_config(name, key):
    field = next(f for f in params_fields(name) if f.name == key)
    value = other_value(name, field)
    cfg = config(name, f"defense.{name}.{key}={json.dumps(value)}")
    params = defense_params(cfg)
    assert isinstance(params, params_class(DEFENSES[name])) and getattr(params, key) == value
    assert all(getattr(params, f.name) == f.default for f in params_fields(name) if f.name != key)
    again = from_yaml(to_yaml(cfg))
    assert defense_params(again) == params and again.defense.params == cfg.defense.params
    assert isinstance(build_strategy(cfg, {NODE + pid: pid for pid in range(8)}, {}), DEFENSES[name])


@pytest.mark.parametrize("name", NAMES)
def test_params_are_a_section_of_their_own(name):
    """Unknown keys under defense.<name> are errors naming them; a defense without Params takes none."""
    with pytest.raises(ConfigError, match=rf"defense\.{name}\.no_such_key: unknown key"):
        config(name, f"defense.{name}.no_such_key=1")
    assert defense_params(config(name)) == params_class(DEFENSES[name])()


@pytest.mark.parametrize("name", NAMES)
def test_params_are_documented_in_the_config_reference(name):
    """Each key of `defense.<name>` is a row of docs/CONFIG.md (generated from the Params, kept current there)."""
    generated = config_reference_markdown()
    written = Path(__file__).resolve().parents[2].joinpath("docs", "CONFIG.md").read_text()
    fields = params_fields(name)
    for text in (generated, written):
        assert (f"| **defense.{name}** | section |" in text) == bool(fields), name
        for field in fields:
            default = "null" if field.default is None else repr(field.default)
            row = next((line for line in text.splitlines() if line.startswith(f"| `defense.{name}.{field.name}` |")),
                       None)
            assert row is not None, f"docs row of defense.{name}.{field.name} missing"
            assert f"| `{default}` |" in row and field.metadata["doc"] in row.replace("&#124;", "|")


# --------------------------------------------------------------------------- hostile replies


def _set(state, key, index, value):
    state[key].flat[index] = value


def _drop(state, key):
    del state[key]


FAULTS = {
    "NaN": (lambda s: _set(s, "fc.weight", 3, np.nan), "'fc.weight' has 1 non-finite value"),
    "inf": (lambda s: _set(s, "conv.weight", 0, np.inf), "'conv.weight' has 1 non-finite value"),
    "missing tensor": (lambda s: _drop(s, "conv.weight"), "model entry 'conv.weight' is missing"),
    "NaN BatchNorm statistics": (lambda s: s["bn.running_mean"].fill(np.nan), "'bn.running_mean' has 2 non-finite"),
    "wrong shape": (lambda s: s.update({"fc.weight": np.ones((3, 2), np.float32)}), "is float32 (3, 2), expected"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("name", NAMES)
def test_a_hostile_client_is_a_counted_failure_under_every_defense(name, fault, offline):
    """NaN, inf, a missing or mis-shaped tensor or NaN BatchNorm statistics from one client, under each defense:
    the rounds complete, the client is failed with its reason, the global model stays finite."""
    strat = offline(strategy(name))
    change, reason = FAULTS[fault]
    g = make_global()
    for server_round in (1, 2):
        g, record = hostile_round(strat, change, server_round, g)
        assert record.failed == [HOSTILE] and record.failures == 1
        assert len(record.errors) == 1 and record.errors[0].startswith(f"client {HOSTILE}: ")
        assert reason in record.errors[0]
        assert all(np.isfinite(v).all() for v in g.values()), name
        assert HOSTILE not in record.extra.get("defense_clients", []) and HOSTILE not in record.client_metrics
    if name == "bulyan":  # 6 valid replies < 4f + 3 = 7: no decision, the round keeps the global model
        assert record.extra["defense_skipped"] is True and "detection_tp" not in record.extra


@pytest.mark.parametrize("name", NAMES)
def test_an_error_reply_is_a_counted_failure_under_every_defense(name, offline):
    """A client that raised (an error reply) is failed with its reason; the others are aggregated."""
    strat = offline(strategy(name))
    g = make_global()
    start_round(strat, g)
    states = [trained(g, u) for u in make_updates()]
    replies = [reply(NODE + i, states[i], EXAMPLES[i]) for i in range(len(states)) if i != HOSTILE]
    failed = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="ValueError: the client crashed"),
                     metadata=reply(NODE + HOSTILE, g, 1).metadata)
    new, _ = strat.aggregate_train(1, [*replies, failed])
    record = strat.rounds[1]
    assert record.failed == [HOSTILE] and "the client crashed" in record.errors[0]
    assert all(np.isfinite(v.numpy()).all() for v in new.values())


# --------------------------------------------------------------------------- what every rule shares


@pytest.mark.parametrize("name", NAMES)
def test_batchnorm_counters_do_not_steer_selection(name, offline):
    """A benign client with many more local steps (batch counter +5000 instead of +5) changes no
    selection, weight or clip factor: the statistics are outside what the rules compare."""
    g, ups = make_global(), make_updates()
    busy = [dict(u) for u in ups]
    busy[0]["bn.num_batches_tracked"] = np.array(5000)
    plain, loud = (aggregate(offline(strategy(name)), g, u)[2] for u in (ups, busy))
    for key in ("defense_kept", "defense_weights", "defense_scales"):
        assert plain.get(key) == loud.get(key), (name, key)


@pytest.mark.parametrize("name", NAMES)
def test_a_round_repeats_exactly_and_is_timed(name, offline):
    """Two strategies built from the same config give the same model (seeded noise included)."""
    g, ups = make_global(), make_updates()
    first, _, extra = aggregate(offline(strategy(name)), g, ups)
    second = aggregate(offline(strategy(name)), g, ups)[0]
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert extra["aggregation_seconds"] >= 0


@pytest.mark.parametrize("name", NAMES)
def test_state_survives_a_checkpoint(name, offline):
    """A strategy restored from another's `state_dict` continues as the original would; foreign state is refused."""
    g, ups = make_global(), make_updates()
    a = offline(strategy(name))
    aggregate(a, g, ups)
    b = offline(strategy(name))
    b.load_state_dict(a.state_dict())
    after_a, after_b = (aggregate(s, g, ups, server_round=2)[0] for s in (a, b))
    assert all(np.array_equal(after_a[k], after_b[k]) for k in after_a)
    with pytest.raises(ValueError, match="keeps no state|unexpected entries"):
        strategy(name).load_state_dict({"bogus": np.ones(2)})


def test_a_stateless_defense_refuses_state():
    with pytest.raises(ValueError, match="keeps no state"):
        strategy("fedavg").load_state_dict({"history/1": np.ones(2)})


# --------------------------------------------------------------------------- a planted outlier

OUT, CLEAN = 9, 9  # partition 9 sends the outlier beside 9 clean updates


def test_the_filtering_exceptions_are_registered_defenses():
    assert set(NOT_FILTERING) <= set(NAMES)


@pytest.mark.parametrize("name", FILTERING)
def test_a_planted_outlier_is_rejected_or_down_weighted(name, offline):
    """One update -1000 x the clean direction beside 9 clean ones: it is rejected (or gets almost no weight, or is
    clipped), and the aggregate stays near the clean mean, where FedAvg's is dragged 100 clean norms away."""
    n = CLEAN + 1
    g, ups = make_global(), make_updates(outlier=-1000.0, n=n, bad=(OUT,))
    examples = [10 + 3 * i for i in range(n)]
    U = np.stack([np.concatenate([np.ravel(u[k]) for k in g]) for u in ups])[:, P]
    clean = U[:OUT].mean(axis=0)
    g0 = clean if name == "fltrust" else None
    strat = offline(strategy(name, n=n, bad=(OUT,)), g0)
    new, _, extra = aggregate(strat, g, ups, attacking=(OUT,), examples=examples)
    plain, _, fedavg = aggregate(strategy("fedavg", n=n, bad=(OUT,)), g, ups, attacking=(OUT,), examples=examples)
    moved, dragged = (np.linalg.norm(applied_delta(m, g)[P] - clean) for m in (new, plain))
    assert moved < 0.02 * dragged and moved < np.linalg.norm(clean), (name, moved, dragged)
    if "defense_kept" in extra:
        assert OUT in extra["defense_rejected"] and extra["detection_recall"] == 1.0, name
    if "defense_weights" in extra and "defense_scales" not in extra:
        assert extra["defense_weights"][OUT] < 1e-3, name
    if "defense_scales" in extra:
        assert extra["defense_scales"][OUT] < 1e-2, name
    if extra.get("defense_attacker_share") is not None:
        assert extra["defense_attacker_share"] < 0.5, name
