"""One server round of a defense on hand-made client updates, without Ray (shared by the tests in this folder).

The strategies run their real `aggregate_train` on Flower Messages built here: replies arrive shuffled, the
strategy sorts them, screens them, aggregates, applies the server learning rate and records detection
metrics. The model has a convolution, BatchNorm (running statistics and a batch counter) and a linear
layer: rules see only the trained parameters (`P`) and the statistics follow the rule's client weights.
By default N = 7 clients take part and client BAD = 3 is the attacker: its update is a large step against
the benign direction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from flip_fl.defenses.updates import bn_statistic_mask, flatten_state
from flip_fl.federation.rounds import RoundRecord
from strategies import SeededFedAvg, build_strategy
from strategies.seeded_fedavg import arrays_to_numpy
from tests.tiny import tiny_config

N, BAD = 7, 3
EXAMPLES = [30, 10, 20, 40, 25, 15, 35]
SHAPES = {"conv.weight": (3, 2), "bn.weight": (2,), "bn.running_mean": (2,), "bn.running_var": (2,),
          "fc.weight": (2, 3), "fc.bias": (2,)}
NODE = 100
"""Node id of partition 0 (partition p is node NODE + p)."""


def make_global(seed: int = 0) -> dict[str, np.ndarray]:
    """The global model: float32 entries, a positive running variance and an int64 batch counter."""
    rng = np.random.default_rng(seed)
    state = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    state["bn.running_var"] = np.abs(state["bn.running_var"]) + 1
    state["bn.num_batches_tracked"] = np.array(100, dtype=np.int64)
    return state


def make_updates(seed: int = 1, outlier: float = -10.0, n: int = N, bad: Sequence[int] = (BAD,)
                 ) -> list[dict[str, np.ndarray]]:
    """Benign updates = a shared direction (|entries| >= 0.5) + small noise; clients in `bad` = outlier * direction."""
    rng = np.random.default_rng(seed)
    direction = {k: (rng.choice([-1.0, 1.0], size=s) * rng.uniform(0.5, 1.0, size=s)) for k, s in SHAPES.items()}
    updates = []
    for i in range(n):
        upd = {k: (outlier * d if i in bad else d + 0.05 * rng.normal(size=d.shape)) for k, d in direction.items()}
        upd["bn.num_batches_tracked"] = np.array(50 if i in bad else 5)
        updates.append(upd)
    return updates


def reply(node: int, state: dict[str, np.ndarray], examples: int) -> Message:
    """A client's train reply from `node`: its model, its weights and its metrics."""
    meta = Metadata(run_id=0, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="", group_id="",
                    created_at=0.0, ttl=3600.0, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()}),
                          "weights": MetricRecord({"num-examples": examples, "unit-weight": 1}),
                          "client-metrics": ConfigRecord({"train_loss": 1.0})})
    return Message(content, metadata=meta)


def config(name: str, *overrides: str, n: int = N, bad: Sequence[int] = (BAD,)):
    """The tiny config with defense `name`, n clients per round out of max(n, 8) and attackers `bad`."""
    return tiny_config(f"defense.name={name}", f"federation.num_clients={max(n, 8)}",
                       f"federation.clients_per_round={n}", f"attack.malicious_ids={list(bad)}", *overrides)


def strategy(name: str, *overrides: str, n: int = N, bad: Sequence[int] = (BAD,)) -> SeededFedAvg:
    """The strategy `defense.name=name` builds, nodes NODE + partition id."""
    cfg = config(name, *overrides, n=n, bad=bad)
    return build_strategy(cfg, {NODE + pid: pid for pid in range(cfg.federation.num_clients)}, {})


def trained(g: dict[str, np.ndarray], update: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The client model `g + update`, in the global model's dtypes."""
    return {k: (g[k] + update[k]).astype(g[k].dtype) for k in g}


def start_round(strat: SeededFedAvg, global_state: dict[str, np.ndarray], server_round: int = 1, n: int = N,
                attacking: Sequence[int] = (BAD,), malicious: Sequence[int] = (BAD,)) -> None:
    """What `configure_train` leaves behind: the global model and the round's record (partitions 0..n-1 sampled)."""
    strat.global_state = global_state
    strat.rounds[server_round] = RoundRecord(sampled=list(range(n)), malicious=list(malicious),
                                             attacking=list(attacking), started=0.0)


def aggregate(strat: SeededFedAvg, global_state: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]],
              server_round: int = 1, attacking: Sequence[int] = (BAD,),
              examples: Sequence[int] = EXAMPLES) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    """Run the strategy's aggregate_train on shuffled replies; (new global, delta matrix U, round extra)."""
    n = len(updates)
    start_round(strat, global_state, server_round, n, attacking)
    states = [trained(global_state, u) for u in updates]
    order = np.random.default_rng(server_round).permutation(n)
    new, _ = strat.aggregate_train(server_round, [reply(NODE + int(i), states[i], examples[i]) for i in order])
    keys = list(global_state)
    U = flatten_state(states, keys) - flatten_state([global_state], keys)[0]
    return arrays_to_numpy(new), U, strat.rounds[server_round].extra


def flat(state: dict[str, np.ndarray]) -> np.ndarray:
    """A state as one float64 vector, in its key order."""
    return flatten_state([state], list(state))[0]


def applied_delta(new: dict[str, np.ndarray], global_state: dict[str, np.ndarray]) -> np.ndarray:
    """new - global, flat."""
    return flat(new) - flat(global_state)


INTEGER = np.concatenate([np.full(np.asarray(v).size, np.issubdtype(np.asarray(v).dtype, np.integer))
                          for v in make_global().values()])
"""The integer entries (the batch counter) of the flat model."""

P = ~bn_statistic_mask(make_global())
"""The trained parameters of the flat model (BatchNorm statistics left out)."""


def assert_update(new: dict[str, np.ndarray], global_state: dict[str, np.ndarray], expected: np.ndarray,
                  atol: float = 1e-5) -> None:
    """new - global equals `expected` on float entries; integer counters get it rounded."""
    actual = applied_delta(new, global_state)
    np.testing.assert_allclose(actual[~INTEGER], expected[~INTEGER], atol=atol)
    np.testing.assert_allclose(actual[INTEGER], np.rint(flat(global_state)[INTEGER] + expected[INTEGER])
                               - flat(global_state)[INTEGER])


def with_statistics(U: np.ndarray, param_delta: np.ndarray, weights: Any) -> np.ndarray:
    """The full expected update: the rule's result on P, the weighted mean of the clients' statistics elsewhere."""
    out = np.empty(U.shape[1])
    out[P] = param_delta
    out[~P] = np.asarray(weights, dtype=float) @ U[:, ~P]
    return out


def example_weights(examples: Sequence[int] = EXAMPLES) -> np.ndarray:
    """The normalised num-examples weights."""
    return np.asarray(examples, float) / sum(examples)


HOSTILE = 5
"""A benign partition whose reply the hostile-reply tests break (BAD = 3 attacks as usual)."""


def hostile_round(strat: SeededFedAvg, fault: Callable[[dict[str, np.ndarray]], Any], server_round: int = 1,
                  global_state: dict[str, np.ndarray] | None = None, examples: Sequence[int] = EXAMPLES
                  ) -> tuple[dict[str, np.ndarray], RoundRecord]:
    """One round in which partition HOSTILE sends `fault` applied to its trained state; (new global, record)."""
    g = make_global() if global_state is None else global_state
    start_round(strat, g, server_round)
    states = [trained(g, u) for u in make_updates()]
    fault(states[HOSTILE])
    order = np.random.default_rng(server_round).permutation(len(states))
    new, _ = strat.aggregate_train(server_round, [reply(NODE + int(i), states[i], examples[i]) for i in order])
    return arrays_to_numpy(new), strat.rounds[server_round]
