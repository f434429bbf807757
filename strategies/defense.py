"""The base of every defense strategy: timing, client update matrices and detection metrics.

A defense is a `SeededFedAvg` (same sampling, roles, failure accounting, evaluation and server
learning rate) whose `aggregate_rule` returns the aggregate model and, for rules that accept, reject
or reweight clients, a `Decision`. The decision is compared with the clients that attacked in the
round and written into that round's metrics line (`RoundRecord.extra`):

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
- `aggregation_seconds`: wall time of the aggregation rule itself (the defense's server cost).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from flip_fl.defenses.common import AggregationOutcome, row_norms
from flip_fl.defenses.updates import bn_statistic_mask, flatten_state, unflatten
from flip_fl.evaluation.detection import detection_scores
from flip_fl.federation import protocol
from flip_fl.registry import DEFENSES
from flip_fl.seeds import DEFENSE_NOISE, numpy_rng
from strategies.seeded_fedavg import SeededFedAvg, arrays_to_numpy, numpy_to_arrays


@dataclass
class Decision:
    """How a rule treated each aggregated client, aligned with the (sorted) replies.

    `norms` (the L2 norms of the updates the rule combined) is set for rules whose aggregate is
    sum_i weights[i] * scales[i] * update_i, so the attackers' share of it can be measured; `skipped`
    is the reason when the rule made no decision this round.
    """

    weights: np.ndarray | None = None
    kept: np.ndarray | None = None
    scales: np.ndarray | None = None
    norms: np.ndarray | None = None
    skipped: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _json_scalar(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def detection_fields(clients: list[int], attacking: list[int], decision: Decision) -> dict[str, Any]:
    """The metrics-line fields of one round's decision (see the module docstring)."""
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
        if decision.norms is not None:
            out["defense_attacker_share"] = attacker_share(w, decision.scales, decision.norms, bad)
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


def attacker_share(weights: np.ndarray, scales: np.ndarray | None, norms: np.ndarray, bad: np.ndarray) -> float | None:
    """The attackers' part of sum_i w_i s_i u_i, by contribution norms |w_i s_i| ||u_i|| (None without attackers)."""
    if not bad.any():
        return None
    s = np.ones_like(weights) if scales is None else np.asarray(scales, dtype=np.float64)
    contribution = np.abs(weights * s) * np.asarray(norms, dtype=np.float64)
    total = float(contribution.sum())
    return float(contribution[bad].sum()) / total if total > 0 else 0.0


@DEFENSES.register("fedavg")
class DefenseStrategy(SeededFedAvg):
    """SeededFedAvg plus timing and detection metrics; subclasses supply `aggregate_rule`.

    Plain FedAvg is this class itself: Flower's (weighted) mean, no decision. Constructor arguments are
    those of `SeededFedAvg`; each defense adds its own keyword arguments.
    """

    name: ClassVar[str] = "fedavg"

    def aggregate_models(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord, MetricRecord | None]:
        """Time the rule and record its decision as detection metrics of the round."""
        record = self.rounds[server_round]
        clients = [self.partition_of[m.metadata.src_node_id] for m in replies]
        evidence = self.collect_evidence(replies)
        start = time.perf_counter()
        aggregate, metrics, decision = self.aggregate_rule(server_round, replies)
        record.extra["aggregation_seconds"] = time.perf_counter() - start
        if decision is None:
            decision = self.explain(evidence)
        if decision is not None:
            record.extra.update(detection_fields(clients, record.attacking, decision))
        return aggregate, metrics

    def aggregate_rule(self, server_round: int,
                       replies: list[Message]) -> tuple[ArrayRecord, MetricRecord | None, Decision | None]:
        """The aggregate client model, the train metrics and the decision (Flower's rule via the MRO)."""
        aggregate, metrics = super().aggregate_models(server_round, replies)
        return aggregate, metrics, None

    def collect_evidence(self, replies: list[Message]) -> Any:
        """Untimed: what `explain` needs, read before a Flower rule consumes the replies."""
        return None

    def explain(self, evidence: Any) -> Decision | None:
        """Untimed: the decision of a rule whose `aggregate_rule` does not report one."""
        return None

    # ---- helpers for rules on client updates (delta_i = local_i - global)

    def client_updates(self, replies: list[Message]) -> np.ndarray:
        """The float64 update matrix (n_clients, d), entries in the global state's key order."""
        keys = list(self.global_state)
        states = [arrays_to_numpy(m.content.array_records[self.arrayrecord_key]) for m in replies]
        return flatten_state(states, keys) - flatten_state([self.global_state], keys)[0]

    def model_from_delta(self, delta: np.ndarray) -> ArrayRecord:
        """Global + delta as an ArrayRecord (float64 for float entries, so no rounding before the server lr)."""
        template = {k: v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v
                    for k, v in self.global_state.items()}
        base = flatten_state([self.global_state], list(template))[0]
        return numpy_to_arrays(unflatten(base + delta, template))

    def parameter_mask(self) -> np.ndarray:
        """True on trained parameters, False on BatchNorm statistics (aligned with `client_updates`)."""
        return ~bn_statistic_mask(self.global_state)

    def example_weights(self, replies: list[Message]) -> np.ndarray:
        """Each reply's aggregation weight under `server.weighted` (num-examples or 1)."""
        return np.array([float(cast(float, m.content.metric_records[protocol.WEIGHTS][self.weighted_by_key]))
                         for m in replies])

    def train_metrics(self, replies: list[Message]) -> MetricRecord | None:
        """Flower's aggregate of the replies' MetricRecords (as FedAvg reports it)."""
        return self.train_metrics_aggr_fn([m.content for m in replies], self.weighted_by_key)


class DeltaDefense(DefenseStrategy):
    """A rule on the trained parameters' updates; subclasses implement `rule`.

    Each rule sees the update matrix of the trained parameters (delta_i = local_i - global, one row per
    sorted reply) and returns an aggregate update and per-client weights. BatchNorm statistics (running
    mean/var, batch counters) are not updates of trained weights -- the counters alone would dominate
    norms and cosines -- so they never enter a rule: their aggregate is the weighted mean of the clients'
    statistics with the rule's weights (a rejected client contributes nothing). The strategy hands back
    global + delta, so SeededFedAvg applies the same server learning rate as everywhere else:
    global += server.lr * delta. Noise is specified as the std that reaches the global model (the rules
    add it to the delta, hence the division by server.lr) and only touches trained parameters.
    """

    def aggregate_rule(self, server_round: int,
                       replies: list[Message]) -> tuple[ArrayRecord, MetricRecord | None, Decision | None]:
        """The rule on the parameter updates; BatchNorm statistics follow the rule's client weights.

        Only clients with a non-zero weight enter the statistics' mean: a rejected client's entries are
        never read, whatever they hold.
        """
        updates = self.client_updates(replies)
        params = self.parameter_mask()
        delta = np.zeros(updates.shape[1])
        delta[params], decision = self.rule(server_round, replies, updates[:, params])
        assert decision.weights is not None
        used = np.flatnonzero(decision.weights)
        delta[~params] = decision.weights[used] @ updates[np.ix_(used, np.flatnonzero(~params))]
        decision.norms = row_norms(updates[:, params])
        return self.model_from_delta(delta), self.train_metrics(replies), decision

    def rule(self, server_round: int, replies: list[Message], updates: np.ndarray) -> tuple[np.ndarray, Decision]:
        """(aggregate update, decision with per-client weights) from the parameter update matrix."""
        raise NotImplementedError



def noise_rng(seed: int, server_round: int) -> np.random.Generator:
    """The noise stream of a round (weak DP, FLAME): same seed and round, same noise."""
    return numpy_rng(seed, server_round, DEFENSE_NOISE)


def outcome_decision(outcome: AggregationOutcome, kept: bool = False, scales: bool = False) -> Decision:
    """The decision of a numpy rule's outcome: its weights, and optionally its client-level choice and scales."""
    return Decision(weights=outcome.weights, kept=outcome.kept if kept else None,
                    scales=outcome.arrays["scale"] if scales else None, info=dict(outcome.info))
