"""Krum, Multi-Krum and Bulyan on a 1M-parameter model with tiny updates, and their float64 reference selection.

Flower's Krum family compares float32 *models* with |a|^2 + |b|^2 - 2<a, b>; when updates are small next
to the model (norms 1e-3 against a model norm of 50) every digit of that difference is rounding and the
selection is arbitrary. The strategies work on float64 updates with each pair's differences summed, so
their selection equals the plain reference here (pairwise loops over `local - global` in float64).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

from flip_fl.federation.rounds import RoundRecord
from strategies import build_strategy
from tests.tiny import tiny_config

N, F = 11, 2  # Bulyan needs n >= 4f + 3 = 11
ATTACKERS = [9, 10]
SIDE = 1000  # a 1000 x 1000 layer: 1M trained parameters, plus BatchNorm statistics
NORMS = [1e-3, 1e-2]


def global_model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"layer.weight": rng.normal(0.0, 0.05, (SIDE, SIDE)).astype(np.float32),
            "bn.running_mean": rng.normal(size=8).astype(np.float32),
            "bn.num_batches_tracked": np.array(40, dtype=np.int64)}


def client_models(g: dict[str, np.ndarray], norm: float, seed: int) -> list[dict[str, np.ndarray]]:
    """Benign updates around a shared direction, two colluding attackers close to each other elsewhere;
    update norms around `norm`, each client's a little different (no ties)."""
    rng = np.random.default_rng(seed)
    d = SIDE * SIDE
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    shared, evil = unit(rng.normal(size=d)), unit(rng.normal(size=d))
    models = []
    for i in range(N):
        if i in ATTACKERS:
            u = unit(evil + 0.2 * unit(rng.normal(size=d)))
        else:
            u = unit(shared + rng.uniform(0.6, 1.2) * unit(rng.normal(size=d)))
        u = u * norm * rng.uniform(0.8, 1.2)
        models.append({"layer.weight": (g["layer.weight"] + u.reshape(SIDE, SIDE)).astype(np.float32),
                       "bn.running_mean": g["bn.running_mean"] + rng.normal(size=8).astype(np.float32),
                       "bn.num_batches_tracked": np.array(45, dtype=np.int64)})
    return models


def reference_selection(g: dict[str, np.ndarray], models: list[dict[str, np.ndarray]]) -> dict[str, list[int]]:
    """The selections, from float64 updates and pairwise differences written out."""
    U = [m["layer.weight"].astype(np.float64).ravel() - g["layer.weight"].astype(np.float64).ravel() for m in models]
    D = np.zeros((N, N))
    for i in range(N):
        for j in range(i + 1, N):
            D[i, j] = D[j, i] = float(np.sum((U[i] - U[j]) ** 2))

    def scores(ids: list[int], neighbours: int) -> list[float]:
        return [sum(sorted(D[i, j] for j in ids if j != i)[:neighbours]) for i in ids]

    krum = scores(list(range(N)), N - F - 2)
    order = sorted(range(N), key=lambda i: (krum[i], i))
    remaining, picks = list(range(N)), []
    for _ in range(N - 2 * F):
        m = len(remaining)
        s = scores(remaining, max(1, min(m - 1, m - F - 2)))
        picks.append(remaining.pop(int(np.argmin(s))))
    return {"krum": order[:1], "multikrum": sorted(order[:N - F]), "bulyan": sorted(picks)}


def replies(models: list[dict[str, np.ndarray]]) -> list[Message]:
    out = []
    for i, m in enumerate(models):
        meta = Metadata(run_id=0, message_id="", src_node_id=100 + i, dst_node_id=0, reply_to_message_id="",
                        group_id="", created_at=0.0, ttl=3600.0, message_type="train")
        out.append(Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in m.items()}),
                                       "weights": MetricRecord({"num-examples": 100, "unit-weight": 1}),
                                       "client-metrics": ConfigRecord({})}), metadata=meta))
    return out


def exact_round(name: str, norm: float) -> tuple[dict[str, list[int]], list[int], Any, list[dict[str, np.ndarray]]]:
    """One round of defense `name` (f = F) on updates of about `norm`: (reference selections, the strategy's
    `defense_kept`, the new global ArrayRecord, the client models)."""
    g = global_model()
    models = client_models(g, norm, seed=int(norm * 1e4))
    expected = reference_selection(g, models)
    cfg = tiny_config(f"defense.name={name}", f"federation.num_clients={N}", f"federation.clients_per_round={N}",
                      f"attack.malicious_ids={ATTACKERS}", f"defense.{name}.num_malicious={F}")
    strat = build_strategy(cfg, {100 + i: i for i in range(N)}, {})
    strat.global_state = g
    strat.rounds[1] = RoundRecord(sampled=list(range(N)), malicious=ATTACKERS, attacking=ATTACKERS, started=0.0)
    new, _ = strat.aggregate_train(1, replies(models))
    return expected, strat.rounds[1].extra["defense_kept"], new, models
