"""Fixed cost of a run: `python sim.py` against a plain in-process loop doing the same work, side by side.

    python benchmarks/fixed_cost.py [--config configs/quickstart.yaml] [--set key.path=value ...] [--repeat N]

Both sides run as fresh processes and are timed from start to exit, one after the other (run it on an
idle machine: both share the cores):

- `sim.py`: the real run (Flower's Simulation Runtime, Ray, actors, records, checkpoints, end-of-run
  files); its summary.json says where its seconds went.
- the plain loop (`--plain-loop`, this file): the same data, model, seeded sampling, client classes and
  `fit` calls (one torch thread each, as in a client actor; `--plain-threads N` gives them N, e.g. all the
  cores, which the simulation's actors use together), a weighted mean with the server learning
  rate (FedAvg, `defense.name: fedavg` only) and the same `GlobalEvaluator` after every round, with no
  Flower, no Ray and no files.

It prints both wall times, their ratio and the phases of each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def plain_loop(config: str, overrides: list[str], threads: int | None = None) -> dict[str, float]:
    """The quickstart's work without Flower: returns phase seconds and the final clean accuracy."""
    started = time.monotonic()
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import torch

    from flip_fl.config import load_config, round_sampler
    from flip_fl.data import client_dataset, load_datasets
    from flip_fl.defenses.updates import apply_server_lr
    from flip_fl.device import torch_device
    from flip_fl.evaluation.evaluator import GlobalEvaluator
    from flip_fl.federation.client import load_client_class
    from flip_fl.federation.protocol import ClientState, RoundInfo
    from flip_fl.models import build_model
    from strategies import evaluation_set

    imported = time.monotonic()
    cfg = load_config(config, overrides)
    if cfg.defense.name != "fedavg":
        raise SystemExit("the plain loop aggregates with FedAvg only (defense.name: fedavg)")
    train, test = load_datasets(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, train)
    device = torch_device(cfg.resources.num_gpus)
    evaluator = GlobalEvaluator(cfg, evaluation_set(cfg, test), device)
    sampler, schedule = round_sampler(cfg), round_sampler(cfg).schedule
    classes = {role: load_client_class(path, role) for role, path in
               (("benign", cfg.roles.benign), ("malicious", cfg.roles.malicious))}
    states = {pid: ClientState() for pid in range(cfg.federation.num_clients)}
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    workdir = Path(tempfile.mkdtemp(prefix="plain-loop-"))
    evaluator.evaluate(model)
    prepared = time.monotonic()
    server_threads = torch.get_num_threads()
    for server_round in range(1, cfg.federation.num_rounds + 1):
        torch.set_num_threads(threads or max(1, int(cfg.resources.num_cpus)))
        results = []
        for pid in sampler.sample(server_round, list(range(cfg.federation.num_clients))):
            index = schedule.attacker_index(pid)
            info = RoundInfo(server_round, index is not None, schedule.is_attack_round(pid, server_round), index)
            client = classes["malicious" if index is not None else "benign"](
                cfg, pid, client_dataset(cfg, pid), device, states[pid], workdir / f"partition-{pid:04d}")
            results.append(client.fit(global_state, info))
        torch.set_num_threads(server_threads)
        weights = np.array([r.num_examples if cfg.server.weighted else 1 for r in results], dtype=np.float64)
        mean = {k: sum(w * r.state[k].double().numpy() for w, r in zip(weights / weights.sum(), results))
                for k in global_state}
        stepped = apply_server_lr({k: v.numpy() for k, v in global_state.items()}, mean, cfg.server.lr)
        global_state = {k: torch.as_tensor(np.asarray(v)).to(global_state[k].dtype) for k, v in stepped.items()}
        model.load_state_dict(global_state)
        metrics = evaluator.evaluate(model)
    done = time.monotonic()
    return {"imports": imported - started, "prepare": prepared - imported, "rounds": done - prepared,
            "clean_acc": float(metrics["clean_acc"] or 0.0)}


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(start, wall seconds, stdout) of a command run to completion; fails loudly if it fails."""
    start = time.time()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({result.returncode}): {result.stderr[-2000:]}")
    return start, wall, result.stdout


def sim_side(config: str, overrides: list[str]) -> tuple[float, dict[str, float]]:
    """Wall time of `sim.py` and its phases (imports and teardown measured around its summary's timings)."""
    with tempfile.TemporaryDirectory(prefix="fixed-cost-") as tmp:
        sets = [item for o in overrides for item in ("--set", o)]
        start, wall, _ = timed([sys.executable, "sim.py", "--config", config, *sets, "--output-dir", f"{tmp}/run"])
        summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
    phases = dict(summary["timings"])
    inside = sum(phases.values())
    phases["shutdown (Flower, Ray, exit)"] = start + wall - summary["finished_at"]
    phases["imports and start-up"] = wall - inside - phases["shutdown (Flower, Ray, exit)"]
    phases["clean_acc"] = summary["final"]["clean_acc"]
    return wall, phases


def plain_side(config: str, overrides: list[str], threads: int | None) -> tuple[float, dict[str, float]]:
    """Wall time of the plain loop in a fresh process, and its phases."""
    sets = [item for o in overrides for item in ("--set", o)]
    extra = ["--plain-threads", str(threads)] if threads else []
    _, wall, stdout = timed([sys.executable, __file__, "--plain-loop", "--config", config, *sets, *extra])
    phases = json.loads(stdout.strip().splitlines()[-1])
    phases["interpreter start and exit"] = wall - sum(v for k, v in phases.items() if k != "clean_acc")
    return wall, phases


def report(sim: tuple[float, dict[str, float]], plain: tuple[float, dict[str, float]]) -> None:
    """Print both wall times, their ratio, the final clean accuracies and each side's phases."""
    (sim_wall, sim_phases), (plain_wall, plain_phases) = sim, plain
    print(f"{'':32}{'sim.py':>10}{'plain loop':>12}")
    print(f"{'wall seconds':32}{sim_wall:10.1f}{plain_wall:12.1f}")
    print(f"{'ratio':32}{sim_wall / plain_wall:10.2f}x")
    print(f"{'final clean_acc':32}{sim_phases.pop('clean_acc'):10.4f}{plain_phases.pop('clean_acc'):12.4f}")
    print("sim.py phases:     " + ", ".join(f"{k} {v:.1f}s" for k, v in sim_phases.items()))
    print("plain loop phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in plain_phases.items()))


def main() -> None:
    """Measure both sides (or, with --plain-loop, run the plain loop and print its phases as JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument("--repeat", type=int, default=1, help="measure each side this many times, alternating")
    parser.add_argument("--plain-threads", type=int, help="torch threads of the plain loop's fits (default: "
                        "resources.num_cpus, as one client actor)")
    parser.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_loop:
        print(json.dumps(plain_loop(args.config, args.set, args.plain_threads)))
        return
    for i in range(args.repeat):
        if args.repeat > 1:
            print(f"-- run {i + 1} of {args.repeat}")
        report(sim_side(args.config, args.set), plain_side(args.config, args.set, args.plain_threads))


if __name__ == "__main__":
    main()
