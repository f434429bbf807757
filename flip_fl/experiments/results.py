"""A run's output directory: resolved config, per-round metrics appended as they happen, summary, model.

Memory stays flat however many rounds a run has: rows go to disk as they come and the summary is read
back from `metrics.jsonl` at the end. A resumed run keeps the rows up to its checkpoint's round and
drops any later ones (rounds it will play again).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flip_fl.config import Config, to_yaml
from flip_fl.tables import write_csv

if TYPE_CHECKING:
    from flip_fl.experiments.round_files import RoundSink


def _clean(value: Any) -> Any:
    """JSON-safe values: NaN/inf become null so every line parses everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def flip_work(metrics: Mapping[str, Any], prefix: str = "") -> str:
    """What a FLIP defense client's round did, from the stats it reports: `warm-up, 37 inversion steps, 5/15 triggers`.

    `prefix`: `"client_"` to read a round row's means over the clients that reported them. Empty when the
    metrics hold no FLIP stats (a plain client).
    """
    steps, found, tried = (metrics.get(f"{prefix}flip_{k}") for k in ("inversion_steps", "triggers_found",
                                                                      "directions"))
    if steps is None:
        return ""
    warmup = "warm-up, " if metrics.get(f"{prefix}flip_warmup") == 1 else ""
    triggers = f", {found:.0f}/{tried:.0f} triggers found" if found is not None and tried is not None else ""
    return f"{warmup}{steps:.0f} inversion steps{triggers}"


def format_round(row: dict[str, Any]) -> str:
    """One compact terminal line for a round (with FLIP defense clients: their mean inversion and hardening time)."""
    parts = [f"round {row['round']:>3}", f"acc {row['clean_acc']:.4f}", f"asr {row['asr']:.4f}"]
    if row.get("asr_no_trigger") is not None:
        parts[-1] += f" (no trigger {row['asr_no_trigger']:.4f})"
    if row.get("threshold", 0.0) > 0:
        parts += [f"acc@tau {row['clean_acc_thresholded']:.4f}", f"asr@tau {row['asr_thresholded']:.4f}",
                  f"rej {row['clean_reject_rate']:.3f}/{row['backdoor_reject_rate']:.3f}"]
    if row["round"] > 0:
        parts.append(f"sampled {len(row['sampled'])} ({len(row['malicious'])} mal)")
        if row.get("failures"):
            parts.append(f"FAILURES {row['failures']}")
        if row.get("client_invert_seconds") is not None:
            parts.append(f"flip per client: invert {row['client_invert_seconds']:.1f}s, harden "
                         f"{row.get('client_harden_seconds', 0.0):.1f}s, {flip_work(row, 'client_')}")
    parts.append(f"{row['seconds']:.1f}s")
    return " | ".join(parts)


RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.csv", "client_metrics.csv", "errors.log", "tensorboard",
             "summary.json", "final_model.pt", "threshold_sweep.csv", "curves.png", "checkpoint.pt",
             "checkpoint.pt.tmp", "client_state")
"""What a run writes into its output directory (`--overwrite` removes exactly these)."""


def default_run_dir(config: str | Path, now: dt.datetime | None = None) -> Path:
    """Where a run of `config` goes when no output directory is given: runs/<config-name>-<timestamp>."""
    return Path("runs") / f"{Path(config).stem}-{(now or dt.datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def holds_run(out_dir: Path) -> bool:
    """Whether `out_dir` holds (part of) a run: then starting another run there would overwrite it."""
    return any((out_dir / name).exists() for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt"))


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a metrics.jsonl, one at a time (stops at a truncated last line)."""
    if not path.is_file():
        return
    with path.open() as fh:
        for line in fh:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return


def backdoor_lifespan(rows: Iterable[Mapping[str, Any]], threshold: float, after: int = 10) -> dict[str, Any]:
    """How long the backdoor outlives the attack, from a run's metric rows in round order (read once, kept flat).

    `last_attack_round` L is the last round whose row has `attack_round` true (null: no attack). `lifespan` is
    r - L for the first round r > L whose `asr` is below `threshold` (Neurotoxin's durability measure: 1 = gone
    in the first round without attack), 0 when the ASR of round L itself is already below it, and null when the
    ASR never falls below it within the run (the backdoor outlived the run: at least the rounds played after L)
    or there was no attack. `asr_at_last_attack` is round L's ASR, `asr_10_after` (for `after` = 10) the ASR of
    round L + `after` (null when the run is shorter). Rows without an ASR are skipped.
    """
    last, asr_last, fell, asr_after = None, None, None, None
    for row in rows:
        rnd, asr = row["round"], row.get("asr")
        if row.get("attack_round"):
            last, asr_last, fell, asr_after = rnd, asr, None, None
        elif last is not None and rnd > last:
            if fell is None and asr is not None and asr < threshold:
                fell = rnd
            if rnd == last + after:
                asr_after = asr
    if last is None:
        lifespan = None
    elif asr_last is not None and asr_last < threshold:
        lifespan = 0
    else:
        lifespan = None if fell is None else fell - last
    return {"last_attack_round": last, "asr_at_last_attack": asr_last, "lifespan": lifespan,
            "lifespan_threshold": threshold, f"asr_{after}_after": asr_after}


def keep_rounds(path: Path, last_round: int) -> None:
    """Rewrite a metrics.jsonl with its rows up to `last_round` only (atomically)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        for row in read_rows(path):
            if row["round"] <= last_round:
                fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


class RunRecorder:
    """Writes `config.yaml` at once, appends `metrics.jsonl` per round, and the final files at the end.

    A fresh recorder (`resume_round` None) starts `metrics.jsonl` empty; a resumed one keeps its rows up to
    `resume_round` (-1: none) and appends after them.
    """

    def __init__(self, out_dir: Path, cfg: Config, resume_round: int | None = None,
                 sinks: Sequence[RoundSink] = ()) -> None:
        self.out_dir = out_dir
        self.sinks = list(sinks)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out_dir / "metrics.jsonl"
        self.lifespan_threshold = cfg.attack.lifespan_threshold
        if resume_round is None:
            (out_dir / "config.yaml").write_text(to_yaml(cfg))
            self.metrics_path.write_text("")
        else:
            keep_rounds(self.metrics_path, resume_round)
        self.started = time.time()

    def record_round(self, row: dict[str, Any]) -> dict[str, Any]:
        """Append one round's metrics (flushed immediately: an interrupted run keeps what it did); returns the row."""
        row = _clean(row)
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        for sink in self.sinks:
            sink.write(row)
        return row

    def close(self) -> None:
        """Close the round sinks (CSV tables, TensorBoard)."""
        for sink in self.sinks:
            sink.close()

    def save_model(self, state: dict[str, torch.Tensor]) -> Path:
        """Save the final global model (`final_model.pt`)."""
        path = self.out_dir / "final_model.pt"
        torch.save(state, path)
        return path

    def write_csv(self, name: str, rows: list[dict[str, Any]]) -> Path:
        """Write a CSV file into the run directory."""
        return write_csv(self.out_dir / name, rows)

    def write_summary(self, extra: dict[str, Any]) -> dict[str, Any]:
        """summary.json: final metrics, best/peak values, the backdoor's lifespan (`backdoor_lifespan`) and timings.

        All read back from metrics.jsonl.
        """
        count, last, max_asr, failures = 0, {}, None, 0
        for row in read_rows(self.metrics_path):
            if row["round"] == 0 and count == 0:
                last = row  # a run of no rounds reports its initial model
                continue
            count, last, failures = count + 1, row, failures + row.get("failures", 0)
            if row.get("asr") is not None:
                max_asr = row["asr"] if max_asr is None else max(max_asr, row["asr"])
        summary = {
            "rounds": count,
            "final": last,
            "max_asr": max_asr,
            "total_failures": failures,
            "wall_seconds": time.time() - self.started,
            **backdoor_lifespan(read_rows(self.metrics_path), self.lifespan_threshold),
            **extra,
        }
        (self.out_dir / "summary.json").write_text(json.dumps(_clean(summary), indent=2) + "\n")
        return summary
