"""What the FLIP defense costs: client fits and whole rounds, measured side by side in one process.

    python benchmarks/flip_cost.py --config configs/mnist.yaml --set data.name=digits \
        --set federation.num_clients=20 --set server.initial_model=null [--device cuda] [--official-round]

For one benign partition (the median-sized one unless `--partition`) and one global model
(`server.initial_model`, or the seeded initial model), it times
- `BenignClient.fit`;
- FLIP `official` and `fast` fits: the first selection (warm-up, nothing cached) and a later
  selection (the same partition again, its cache from the first), split into inversion and hardening;
- one round of the config (round `--round`: its sampled clients, the attackers due, every client's
  fit one after another, aggregation and server evaluation) undefended and with FLIP `fast` on the
  benign clients (their caches warmed on the same model first, untimed); `--official-round` adds the
  official one (slow: minutes on a CPU).
It prints seconds and ratios. Timings use one torch thread (as a 1-CPU Ray actor) unless `--threads`.
`--throughput` also prints the inversion's throughput for K = 1, 10, 90 batched tasks.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from clients import BenignClient, FlipDefenseClient
from flip_fl.config import Config, attack_schedule, load_config, round_sampler
from flip_fl.data import client_dataset, load_datasets
from flip_fl.defenses.flip_defense.inversion import InversionSettings, invert_triggers
from flip_fl.defenses.updates import apply_server_lr
from flip_fl.device import torch_device
from flip_fl.evaluation.evaluator import GlobalEvaluator
from flip_fl.federation.client import BaseClient, ClientState, RoundInfo, load_client_class
from flip_fl.models import build_model
from strategies import evaluation_set

StateDict = dict[str, torch.Tensor]


def with_schedule(cfg: Config, schedule: Literal["official", "fast"]) -> Config:
    """`cfg` with `flip_defense.schedule` replaced."""
    return replace(cfg, flip_defense=replace(cfg.flip_defense, schedule=schedule))


def round_info(cfg: Config, pid: int, server_round: int) -> RoundInfo:
    """What the server tells partition `pid` in `server_round` (its role and whether it attacks)."""
    schedule = attack_schedule(cfg)
    index = schedule.attacker_index(pid)
    return RoundInfo(server_round, index is not None, schedule.is_attack_round(pid, server_round), index)


def fit(cfg: Config, cls: type[BaseClient], pid: int, state: ClientState, global_state: StateDict,
        device: torch.device, server_round: int = 1) -> tuple[float, dict[str, float], ClientState]:
    """Seconds and metrics of one `cls.fit` on partition `pid` (the state is updated in place)."""
    info = round_info(cfg, pid, server_round)
    client = cls(cfg, pid, client_dataset(cfg, pid), device, state, Path("/nonexistent"))
    start = time.perf_counter()
    result = client.fit({k: v.clone() for k, v in global_state.items()}, info)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result.metrics, client.state


def client_fits(cfg: Config, pid: int, global_state: StateDict, device: torch.device, repeats: int) -> list[tuple]:
    """(label, seconds, invert seconds, harden seconds) of the benign and FLIP fits on one partition."""
    rows = []
    times = [fit(cfg, BenignClient, pid, ClientState(), global_state, device)[0] for _ in range(repeats)]
    rows.append(("benign fit", statistics.median(times), 0.0, 0.0))
    for schedule in ("official", "fast"):
        scfg = with_schedule(cfg, schedule)
        seconds, m, state = fit(scfg, FlipDefenseClient, pid, ClientState(), global_state, device)
        rows.append((f"FLIP {schedule}, first selection", seconds, m["invert_seconds"], m["harden_seconds"]))
        later = [fit(scfg, FlipDefenseClient, pid, ClientState(dict(state.arrays), dict(state.values)),
                     global_state, device, server_round=2) for _ in range(repeats if schedule == "fast" else 1)]
        best = sorted(later, key=lambda r: r[0])[len(later) // 2]
        rows.append((f"FLIP {schedule}, later selection", best[0], best[1]["invert_seconds"],
                     best[1]["harden_seconds"]))
    return rows


def one_round(cfg: Config, benign: str, server_round: int, global_state: StateDict, device: torch.device,
              evaluator: GlobalEvaluator, model: torch.nn.Module) -> float:
    """Seconds of one round done in-process: every sampled client's fit, aggregation, evaluation.

    FLIP clients get a cache warmed on the same global model first (untimed): a later selection.
    """
    cfg = replace(cfg, roles=replace(cfg.roles, benign=benign))
    sampled = round_sampler(cfg).sample(server_round, list(range(cfg.federation.num_clients)))
    bad = set(attack_schedule(cfg).malicious)
    classes = {pid: load_client_class(cfg.roles.malicious if pid in bad else benign, "client") for pid in sampled}
    states = {pid: ClientState() for pid in sampled}
    for pid in sampled:
        if pid not in bad and benign != "clients.BenignClient":
            fit(cfg, classes[pid], pid, states[pid], global_state, device, server_round - 1)
    start = time.perf_counter()
    outs = []
    for pid in sampled:
        client = classes[pid](cfg, pid, client_dataset(cfg, pid), device, states[pid], Path("/nonexistent"))
        result = client.fit({k: v.clone() for k, v in global_state.items()}, round_info(cfg, pid, server_round))
        outs.append(({k: v.numpy() for k, v in result.state.items()}, result.num_examples))
    weights = np.array([n if cfg.server.weighted else 1.0 for _, n in outs]) / sum(
        n if cfg.server.weighted else 1.0 for _, n in outs)
    mean = {k: sum(w * o[k].astype(np.float64) for w, (o, _) in zip(weights, outs)) for k in outs[0][0]}
    new = apply_server_lr({k: v.numpy() for k, v in global_state.items()}, mean, cfg.server.lr)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in new.items()})
    evaluator.evaluate(model)
    return time.perf_counter() - start


def throughput(model: torch.nn.Module, image_shape: tuple[int, int, int], device: torch.device) -> list[tuple]:
    """Inversion steps per second for K = 1, 10, 90 batched tasks of 10 images each."""
    rows = []
    for k in (1, 10, 90):
        tasks = [(torch.rand(10, *image_shape), t % 10) for t in range(k)]
        settings = InversionSettings(steps=50, reinit_noise=0.01)
        invert_triggers(model, tasks, replace(settings, steps=5), torch.Generator().manual_seed(0))  # warm-up
        start = time.perf_counter()
        invert_triggers(model, tasks, settings, torch.Generator().manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append((k, settings.steps / seconds, settings.steps * k / seconds))
    return rows


def median_partition(cfg: Config) -> int:
    """The benign partition of median size."""
    bad = set(attack_schedule(cfg).malicious)
    sizes = sorted((len(client_dataset(cfg, p)), p) for p in range(cfg.federation.num_clients) if p not in bad)
    return sizes[len(sizes) // 2][1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--partition", type=int, help="benign partition to time (default: the median-sized one)")
    parser.add_argument("--round", type=int, default=2, help="round whose sample is timed (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many benign and fast fits")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--official-round", action="store_true", help="also time a round with official FLIP")
    parser.add_argument("--throughput", action="store_true", help="inversion steps/s for K = 1, 10, 90 tasks")
    return parser.parse_args(argv)


def print_fits(rows: list[tuple]) -> None:
    """The client-fit table and its two ratios."""
    benign = rows[0][1]
    print(f"\n{'client fit':34} {'seconds':>9} {'invert':>9} {'harden':>9} {'x benign':>9} {'fit/harden':>10}")
    for label, seconds, inv, hard in rows:
        ratio = f"{seconds / hard:10.2f}" if hard else f"{'':10}"
        print(f"{label:34} {seconds:9.3f} {inv:9.3f} {hard:9.3f} {seconds / benign:9.1f} {ratio}")
    official_later, fast_later = rows[2], rows[4]
    print(f"\nfast later fit / its own hardening: {fast_later[1] / fast_later[3]:.2f} (target <= 2)")
    print(f"official later fit / fast later fit: {official_later[1] / fast_later[1]:.1f} (target >= 20)")


def print_rounds(cfg: Config, args: argparse.Namespace, global_state: StateDict, model: torch.nn.Module,
                 device: torch.device) -> None:
    """One round of the config undefended, with fast FLIP (and official FLIP with --official-round)."""
    _, test = load_datasets(cfg)
    evaluator = GlobalEvaluator(cfg, evaluation_set(cfg, test), device)
    variants = [("undefended", "clients.BenignClient", cfg),
                ("FLIP fast", "clients.FlipDefenseClient", with_schedule(cfg, "fast"))]
    if args.official_round:
        variants.append(("FLIP official", "clients.FlipDefenseClient", with_schedule(cfg, "official")))
    times = {label: one_round(c, benign, args.round, global_state, device, evaluator, model)
             for label, benign, c in variants}
    print(f"\n{'round ' + str(args.round):34} {'seconds':>9} {'x undefended':>13}")
    for label, seconds in times.items():
        print(f"{label:34} {seconds:9.3f} {seconds / times['undefended']:13.2f}")
    print(f"\nfast-defended round / undefended round: {times['FLIP fast'] / times['undefended']:.2f} (target <= 3)")


def main(argv: list[str] | None = None) -> int:
    """Time the fits and rounds the command line asks for and print the tables."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else torch_device(1.0)
    cfg = load_config(args.config, args.set)
    train, _ = load_datasets(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, train)
    if cfg.server.initial_model:
        model.load_state_dict(torch.load(cfg.server.initial_model, map_location="cpu", weights_only=True))
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pid = args.partition if args.partition is not None else median_partition(cfg)
    print(f"config {args.config} | data {cfg.data.name} | model {cfg.model.name} | partition {pid} "
          f"({len(client_dataset(cfg, pid))} images) | device {device} | threads {args.threads}")
    print_fits(client_fits(cfg, pid, global_state, device, args.repeats))
    model = model.to(device)
    print_rounds(cfg, args, global_state, model, device)
    if args.throughput:
        print(f"\n{'batched tasks K':>16} {'steps/s':>10} {'task-steps/s':>13}")
        for k, sps, tsps in throughput(model, train.image_shape, device):
            print(f"{k:16d} {sps:10.1f} {tsps:13.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
