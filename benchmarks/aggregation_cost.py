"""Server aggregation cost of every defense, as a multiple of FedAvg's, at 10, 100 and 1,000 clients per round.

Each defense runs its real `aggregate_train` (screening, the update matrix, the rule, BatchNorm statistics,
the decision's metrics, the server step) in this process, without Ray, on replies built from a model of about
1M parameters: `resnet18` at width 0.3 on 3x32x32 inputs (1.0M parameters with its BatchNorm layers). Client
models are the global model plus a seeded random update; `--attackers` of them take a scaled, flipped update.
Defenses that train or run models on the server (FLTrust, FLARE, DeepSight) do so on their own seeded data.
FedAvg and each defense are timed side by side in this one run, `--repeat` times each (the median counts).

A size whose replies and update matrices would not fit `--memory-gb` (replies in float32 plus two float64
copies of the update matrix: about 20 bytes per parameter and client) is skipped with the estimate, never
attempted: this machine is shared.

    python benchmarks/aggregation_cost.py                          # every defense, 10 and 100 clients
    python benchmarks/aggregation_cost.py --clients 10 100 1000 --memory-gb 24 --defenses fedavg krum median
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flip_fl.config import ConfigError, config_from_dict  # noqa: E402
from flip_fl.data import load_datasets  # noqa: E402
from flip_fl.federation.rounds import RoundRecord  # noqa: E402
from flip_fl.models import build_model  # noqa: E402
from flip_fl.registry import DEFENSES  # noqa: E402
from flip_fl.training import state_on_cpu  # noqa: E402
from strategies import SeededFedAvg, build_strategy  # noqa: E402

BYTES_PER_PARAMETER = 20
"""Peak bytes per parameter and client: the float32 reply, the float64 update matrix and its parameter slice."""
NODE = 1000
"""Node id of partition 0."""


def run_config(clients: int, attackers: int) -> dict:
    """The config the strategies are built from: 1M-parameter model, `clients` sampled of `clients` nodes."""
    return {"seed": 0, "data": {"name": "synthetic", "synthetic": {"channels": 3, "image_size": 32,
                                                                   "train_size": max(clients, 1000),
                                                                   "test_size": 1000}},
            "model": {"name": "resnet18", "width": 0.3},
            "federation": {"num_clients": clients, "clients_per_round": clients, "num_rounds": 1},
            "attack": {"num_malicious": attackers}, "training": {"max_batches": 2, "batch_size": 32}}


def client_states(global_state: dict[str, np.ndarray], clients: int, attackers: int,
                  seed: int) -> list[dict[str, np.ndarray]]:
    """`clients` models around the global one: a shared benign direction plus noise; the first `attackers` flipped."""
    rng = np.random.default_rng(seed)
    direction = {k: rng.normal(scale=1e-3, size=v.shape) for k, v in global_state.items() if v.dtype.kind == "f"}
    states = []
    for i in range(clients):
        scale = -10.0 if i < attackers else 1.0
        states.append({k: (v + scale * direction[k] + rng.normal(scale=2e-4, size=v.shape)).astype(v.dtype)
                       if k in direction else np.asarray(v + 5) for k, v in global_state.items()})
    return states


def reply(node: int, state: dict[str, np.ndarray]) -> Message:
    """A client's train reply: its model, weights and one metric."""
    meta = Metadata(run_id=0, message_id="", src_node_id=node, dst_node_id=0, reply_to_message_id="", group_id="",
                    created_at=0.0, ttl=3600.0, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in state.items()}),
                          "weights": MetricRecord({"num-examples": 100, "unit-weight": 1}),
                          "client-metrics": ConfigRecord({"train_loss": 1.0})})
    return Message(content, metadata=meta)  # type: ignore[call-overload]  # a reply as the runtime builds it


def time_round(strategy: SeededFedAvg, global_state: dict[str, np.ndarray], states: list[dict[str, np.ndarray]],
               attackers: int, server_round: int) -> float:
    """Seconds of one `aggregate_train` on fresh replies (messages are consumed by Flower's rules)."""
    strategy.global_state = global_state
    strategy.rounds[server_round] = RoundRecord(sampled=list(range(len(states))), malicious=list(range(attackers)),
                                                attacking=list(range(attackers)), started=0.0)
    replies = [reply(NODE + i, s) for i, s in enumerate(states)]
    start = time.perf_counter()
    strategy.aggregate_train(server_round, replies)
    return time.perf_counter() - start


def measure(name: str, clients: int, attackers: int, repeat: int) -> float:
    """Median seconds of `repeat` rounds of defense `name` at `clients` clients per round."""
    cfg = config_from_dict({**run_config(clients, attackers), "defense": {"name": name}})
    model = build_model(cfg.model, load_datasets(cfg)[0])
    global_state = {k: v.numpy() for k, v in state_on_cpu(model).items()}
    strategy = build_strategy(cfg, {NODE + p: p for p in range(clients)}, {})
    times = [time_round(strategy, global_state, client_states(global_state, clients, attackers, r), attackers, r)
             for r in range(1, repeat + 1)]
    return statistics.median(times)


def parameters() -> int:
    """Parameters of the benchmark's model (trained ones and BatchNorm statistics)."""
    cfg = config_from_dict(run_config(10, 0))
    return sum(v.numel() for v in build_model(cfg.model, load_datasets(cfg)[0]).state_dict().values())


def main() -> None:
    """Print one table row per defense: seconds and multiple of FedAvg at each size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--defenses", nargs="+", default=None, help="default: every registered defense")
    parser.add_argument("--attackers", type=float, default=0.2, help="fraction of clients that attack")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--memory-gb", type=float, default=6.0)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)  # strategies built per size say evaluation is off
    names = args.defenses or list(DEFENSES.names)
    d = parameters()
    sizes = []
    for n in args.clients:
        need = BYTES_PER_PARAMETER * d * n / 1e9
        if need > args.memory_gb:
            print(f"{n} clients: skipped, needs about {need:.1f} GB > --memory-gb {args.memory_gb:g}")
        else:
            sizes.append(n)
    print(f"model: resnet18 width 0.3, {d:,} parameters; median of {args.repeat} rounds; "
          f"{args.attackers:.0%} attackers\n")
    base = {n: measure("fedavg", n, int(args.attackers * n), args.repeat) for n in sizes}
    header = "| defense | " + " | ".join(f"{n} clients: s | x fedavg" for n in sizes) + " |"
    print(header)
    print("|---|" + "---|---|" * len(sizes))
    for name in names:
        cells = []
        for n in sizes:
            try:
                seconds = base[n] if name == "fedavg" else measure(name, n, int(args.attackers * n), args.repeat)
            except ConfigError as err:  # e.g. Bulyan's bound at this size
                cells.append(f"n/a ({err}) | ")
                continue
            cells.append(f"{seconds:.3f} | {seconds / base[n]:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
