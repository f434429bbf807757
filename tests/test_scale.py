"""Cost that must not grow with the number of rounds: validation, the schedule, and the server loop's memory."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from flip_fl.config import attack_schedule, max_attackers_per_round
from flip_fl.schedule import RoundWindow, due_counts
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("overrides, attacker, attacks_late", [
    (("attack.num_malicious=2", "defense.name=krum", "federation.num_clients=20", "federation.clients_per_round=7"), 0,
     True),
    (("attack.num_malicious=2", "attack.start_round=5", "attack.end_round=900000000", "defense.name=bulyan",
      "federation.num_clients=20", "federation.clients_per_round=11"), 1, False),
    (("attack.num_malicious=3", "attack.mode=single_shot", "attack.rounds=[7, [1, 999999999], 5]",
      "federation.num_clients=20"), 1, True),
])
def test_a_billion_round_config_validates_at_once(overrides, attacker, attacks_late):
    tracemalloc.start()
    start = time.perf_counter()
    cfg = tiny_config("federation.num_rounds=1000000000", *overrides)
    schedule = attack_schedule(cfg)
    seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 2.0 and peak < 5 * 2**20, (seconds, peak)
    assert schedule.is_attack_round(schedule.malicious[attacker], 999_999_999) == attacks_late
    assert max_attackers_per_round(cfg) >= 1


def test_due_counts_agree_with_counting_round_by_round():
    rng = random.Random(0)
    for _ in range(200):
        last = rng.randint(1, 30)
        rounds = [RoundWindow(rng.randint(1, 35), rng.randint(0, 40)) if rng.random() < 0.5 else
                  frozenset(rng.sample(range(1, last + 1), rng.randint(1, min(3, last))))
                  for _ in range(rng.randint(0, 4))]
        steps = due_counts(rounds, last)
        expected = [sum(r in item for item in rounds) for r in range(1, last + 1)]
        bounds = [first for first, _ in steps] + [last + 1]
        got = [count for (first, count), end in zip(steps, bounds[1:]) for _ in range(first, end)]
        assert got == expected, (rounds, steps)
    assert RoundWindow(3, 6) == {3, 4, 5, 6} and len(RoundWindow(5, 4)) == 0 and 7 not in RoundWindow(3, 6)


FLAT_MEMORY = """
import gc, json, logging, sys
from pathlib import Path
from flip_fl.experiments.run import execute, prepare
from tests.inprocess import LocalGrid
from tests.tiny import tiny_config

logging.getLogger("flwr").setLevel(logging.ERROR)
marks = {}

def rss_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024

def measure(messages):
    config = messages[0].content.config_records.get("config") if messages else None
    done = int(config["server-round"]) - 1 if config is not None else -1
    if done in (200, 1000, 2000):
        gc.collect()
        marks[done] = {"rss_mb": rss_mb(), "objects": len(gc.get_objects())}

cfg = tiny_config("roles.benign=tests.fake_clients.CountingClient", "federation.num_rounds=2001",
                  "federation.clients_per_round=3", "data.synthetic.train_size=120", "data.synthetic.test_size=10",
                  "attack.num_malicious=1", "roles.malicious=tests.fake_clients.CountingClient", "checkpoint.every=10")
execute(LocalGrid(6, on_push=measure), prepare(cfg, Path(sys.argv[1])))
print(json.dumps(marks))
"""


@pytest.mark.e2e  # about a minute: 2,000 rounds of the real loop, records and checkpoints (no Ray)
def test_server_loop_memory_stays_flat_over_2000_rounds(tmp_path):
    result = subprocess.run([sys.executable, "-c", FLAT_MEMORY, str(tmp_path / "run")], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    marks = {int(k): v for k, v in json.loads(result.stdout.strip().splitlines()[-1]).items()}
    print(f"RSS after 200 rounds {marks[200]['rss_mb']:.1f} MB, after 2000 {marks[2000]['rss_mb']:.1f} MB; "
          f"Python objects after 1000 {marks[1000]['objects']}, after 2000 {marks[2000]['objects']}")
    assert marks[2000]["rss_mb"] <= 1.10 * marks[200]["rss_mb"], marks
    # finer than RSS: keeping one small dict per round would add thousands of objects here
    assert marks[2000]["objects"] - marks[1000]["objects"] < 300, marks
    assert sum(1 for _ in (tmp_path / "run" / "metrics.jsonl").open()) == 2002
