"""The public base of every server defense: one rule on the round's update matrix, and what it decided.

A defense is a `SeededFedAvg` (same sampling, roles, failure accounting, evaluation and server learning
rate) with one hook, `rule`: the round's trained-parameter updates in (`RoundUpdates`), the aggregate
update and a `Decision` out. Everything else is done here once: the update matrix, BatchNorm statistics,
timing, the decision's metrics and the server step. A defense is one file in `strategies/`:

    @DEFENSES.register("halve")
    class HalveDefense(Defense):
        @dataclass
        class Params:                                   # defense.halve.* in the config (docs/CONFIG.md)
            factor: float = key(0.5, "Multiplier of the mean update.", gt=0.0)

        def __init__(self, *, factor: float = 0.5, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.factor = factor

        def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
            weights = updates.weights / updates.weights.sum()
            return self.factor * weights @ updates.matrix, Decision(weights=weights)

The decision is compared with the clients that attacked in the round and written into that round's
metrics line (`RoundRecord.extra`):

- `defense_clients`: partition ids of the aggregated replies (sorted), the order of every list below;
- `defense_weights`: each client's coefficient in the aggregate; `defense_scales`: per-client
  rescaling (norm clipping) when the rule applies one;
- `defense_kept` / `defense_rejected`: partition ids, for rules that decide per client;
- `detection_tp/fp/fn/tn/precision/recall/f1/rejection_rate/false_positive_rate`: rejection seen as
  detection of the attacking clients (`flip_fl.evaluation.detection`; positive = rejected);
- `defense_attacker_weight`: the attacking clients' total weight in the rule, before any clipping or
  rescaling (null without attackers);
- `defense_attacker_share`: the attacking clients' share of the aggregate update itself, after clipping
  and rescaling: sum over attackers of |w_i s_i u_i| / sum over all clients (rules that combine whole
  updates; null without attackers);
- `defense_skipped`, `defense_skip_reason`: a round the rule could not decide (too few valid replies
  for Krum's or Bulyan's bound) keeps the global model and records no kept/rejected lists or detection
  counts, so rounds without a decision never count as rejections;
- `defense_<key>`: the rule's scalar diagnostics (clip norm, cluster size, flipped coordinates...);
- `aggregation_seconds`: wall time of the rule itself (the defense's server cost).
"""

from __future__ import annotations

import time
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from flwr.app import ArrayRecord, Message, MetricRecord

from flip_fl.defenses.common import AggregationOutcome, row_norms
from flip_fl.defenses.updates import bn_statistic_mask, flatten_state, unflatten
from flip_fl.evaluation.detection import detection_scores
from flip_fl.federation import protocol
from flip_fl.seeds import DEFENSE_NOISE, numpy_rng
from strategies.seeded_fedavg import SeededFedAvg, arrays_to_numpy, numpy_to_arrays

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class RoundUpdates:
    """What a rule sees of one round.

    Attributes:
        server_round: the round.
        matrix: (n, d) float64 updates `local_i - global` of the trained parameters (BatchNorm statistics
            left out), one row per valid reply in partition order.
        weights: (n,) each reply's aggregation weight under `server.weighted` (its number of examples, or
            1), not normalised.
        clients: the replies' partition ids, aligned with the rows.
    """

    server_round: int
    matrix: FloatArray
    weights: FloatArray
    clients: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.clients)


@dataclass
class Decision:
    """How a rule treated each aggregated client, aligned with the rows of `RoundUpdates`.

    Attributes:
        weights: each client's coefficient in the aggregate (None: the rule reports none).
        kept: per client, accepted (True) or rejected, for rules that decide per client.
        scales: per-client rescaling applied before weighting (norm clipping).
        coordinatewise: the aggregate is per coordinate (median, trimmed mean, Bulyan's second stage), not a
            combination of whole updates: no attackers' share of it is measured.
        statistics_weights: the weights that average BatchNorm statistics (None: `weights`).
        skipped: the reason when the rule made no decision this round (the global model is kept).
        info: the rule's scalar diagnostics, recorded as `defense_<key>`.
    """

    weights: FloatArray | None = None
    kept: BoolArray | None = None
    scales: FloatArray | None = None
    coordinatewise: bool = False
    statistics_weights: FloatArray | None = None
    skipped: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, outcome: AggregationOutcome, kept: bool = False, scales: bool = False) -> Decision:
        """The decision of a numpy rule's outcome: its weights, optionally its client-level choice and scales."""
        return cls(weights=outcome.weights, kept=outcome.kept if kept else None,
                   scales=outcome.arrays["scale"] if scales else None, info=dict(outcome.info))


def _json_scalar(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def detection_fields(clients: list[int], attacking: list[int], decision: Decision,
                     norms: FloatArray | None = None) -> dict[str, Any]:
    """The metrics-line fields of one round's decision (see the module docstring); `norms`: the update norms."""
    bad = np.array([pid in set(attacking) for pid in clients], dtype=bool)
    out: dict[str, Any] = {"defense_clients": list(clients)}
    if decision.skipped is not None:
        out.update({"defense_skipped": True, "defense_skip_reason": decision.skipped})
        out.update({f"defense_{k}": _json_scalar(v) for k, v in decision.info.items() if k != "skipped"})
        return out
    if decision.weights is not None:
        w = np.asarray(decision.weights, dtype=np.float64)
        out["defense_weights"] = [round(float(v), 6) for v in w]
        out["defense_attacker_weight"] = float(w[bad].sum()) if bad.any() else None
        if norms is not None and not decision.coordinatewise:
            out["defense_attacker_share"] = attacker_share(w, decision.scales, norms, bad)
    if decision.scales is not None:
        out["defense_scales"] = [round(float(v), 6) for v in decision.scales]
    if decision.kept is not None:
        kept = np.asarray(decision.kept, dtype=bool)
        out["defense_kept"] = [pid for pid, k in zip(clients, kept) if k]
        out["defense_rejected"] = [pid for pid, k in zip(clients, kept) if not k]
        scores = detection_scores(kept, bad)
        out.update({f"detection_{k}": v for k, v in scores.items()
                    if k not in ("num_rejected", "num_malicious")})
    out.update({f"defense_{k}": _json_scalar(v) for k, v in decision.info.items()})
    return out


def attacker_share(weights: FloatArray, scales: FloatArray | None, norms: FloatArray,
                   bad: BoolArray) -> float | None:
    """The attackers' part of sum_i w_i s_i u_i, by contribution norms |w_i s_i| ||u_i|| (None without attackers)."""
    if not bad.any():
        return None
    s = np.ones_like(weights) if scales is None else np.asarray(scales, dtype=np.float64)
    contribution = np.abs(weights * s) * np.asarray(norms, dtype=np.float64)
    total = float(contribution.sum())
    return float(contribution[bad].sum()) / total if total > 0 else 0.0


def noise_rng(seed: int, server_round: int) -> np.random.Generator:
    """The noise stream of a round (weak DP, FLAME): same seed and round, same noise."""
    return numpy_rng(seed, server_round, DEFENSE_NOISE)


class Defense(SeededFedAvg):
    """A server defense: `SeededFedAvg` whose aggregate update is `rule(updates)`.

    Subclasses implement `rule` and declare their parameters twice over: as explicit keyword arguments of
    `__init__` (with defaults, as Flower's strategies do) and as the `Params` dataclass of config keys
    `defense.<name>.*` (defaults, ranges and one documentation line each, `flip_fl.config.key`), with
    `check`, `options` and `held_out` (`SeededFedAvg`) when the config needs more than that.

    BatchNorm statistics (running mean/var, batch counters) are not updates of trained weights -- the
    counters alone would dominate norms and cosines -- so they never enter a rule: their aggregate is the
    mean of the clients' statistics with the decision's weights (a rejected client contributes nothing).
    The strategy hands back global + delta, so SeededFedAvg applies the same server learning rate as
    everywhere else: global += server.lr * delta. Noise is specified as the std that reaches the global
    model (the rules add it to the delta, hence the division by server.lr).
    """

    @abstractmethod
    def rule(self, updates: RoundUpdates) -> tuple[FloatArray, Decision]:
        """The aggregate update (d,) of the trained parameters and the decision behind it."""

    def aggregate_models(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord, MetricRecord | None]:
        """Run the rule on the replies' updates (timed) and record its decision as detection metrics of the round.

        Only clients with a non-zero weight enter the BatchNorm statistics' mean: a rejected client's
        entries are never read, whatever they hold. A skipped round keeps the global model.
        """
        record = self.rounds[server_round]
        clients = tuple(self.partition_of[m.metadata.src_node_id] for m in replies)
        all_updates = self.client_updates(replies)
        params = ~bn_statistic_mask(self.global_state)
        updates = RoundUpdates(server_round, all_updates[:, params], self.example_weights(replies), clients)
        start = time.perf_counter()
        delta_params, decision = self.rule(updates)
        record.extra["aggregation_seconds"] = time.perf_counter() - start
        delta = np.zeros(all_updates.shape[1])
        if decision.skipped is None:
            delta[params] = delta_params
            statistics = decision.statistics_weights if decision.statistics_weights is not None else decision.weights
            assert statistics is not None, f"{type(self).__name__}.rule returned a decision without weights"
            used = np.flatnonzero(statistics)
            delta[~params] = statistics[used] @ all_updates[np.ix_(used, np.flatnonzero(~params))]
        record.extra.update(detection_fields(list(clients), record.attacking, decision, row_norms(updates.matrix)))
        return self.model_from_delta(delta), self.train_metrics(replies)

    def client_models(self, updates: RoundUpdates) -> tuple[npt.NDArray[np.floating[Any]], FloatArray]:
        """The clients' trained parameters as they sent them, and the global model's (float64).

        Global + update in the global model's float dtype: the updates are exact float64 differences of
        float32 models, so this gives back the clients' own numbers, for rules defined on models.
        """
        trained = ~bn_statistic_mask(self.global_state)
        dtype = np.result_type(*[v.dtype for v in self.global_state.values() if v.dtype.kind == "f"])
        global_params = flatten_state([self.global_state])[0][trained]
        return (global_params + updates.matrix).astype(dtype), global_params

    def client_updates(self, replies: list[Message]) -> FloatArray:
        """The float64 update matrix (n_clients, d), entries in the global state's key order."""
        keys = list(self.global_state)
        states = [arrays_to_numpy(m.content.array_records[self.arrayrecord_key]) for m in replies]
        return flatten_state(states, keys) - flatten_state([self.global_state], keys)[0]

    def model_from_delta(self, delta: FloatArray) -> ArrayRecord:
        """Global + delta as an ArrayRecord (float64 for float entries, so no rounding before the server lr)."""
        template = {k: v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v
                    for k, v in self.global_state.items()}
        base = flatten_state([self.global_state], list(template))[0]
        return numpy_to_arrays(unflatten(base + delta, template))

    def example_weights(self, replies: list[Message]) -> FloatArray:
        """Each reply's aggregation weight under `server.weighted` (num-examples or 1)."""
        return np.array([float(cast(float, m.content.metric_records[protocol.WEIGHTS][self.weighted_by_key]))
                         for m in replies])

    def train_metrics(self, replies: list[Message]) -> MetricRecord | None:
        """Flower's aggregate of the replies' MetricRecords (as FedAvg reports it)."""
        return self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key)
