"""A run's output directory: resolved config, per-round metrics appended as they happen, summary, model."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
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


class RunRecorder:
    """Writes `config.yaml` at once, appends `metrics.jsonl` per round, and the final files at the end."""

    def __init__(self, out_dir: Path, cfg: Config, echo: bool = True, sinks: Sequence[RoundSink] = ()) -> None:
        self.out_dir = out_dir
        self.echo = echo
        self.sinks = list(sinks)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
        self.metrics_path = out_dir / "metrics.jsonl"
        self.metrics_path.write_text("")
        self.rows: list[dict[str, Any]] = []
        self.started = time.time()

    def record_round(self, row: dict[str, Any]) -> None:
        """Append one round's metrics (flushed immediately: an interrupted run keeps what it did)."""
        row = _clean(row)
        self.rows.append(row)
        with self.metrics_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        for sink in self.sinks:
            sink.write(row)
        if self.echo:
            print(format_round(row), flush=True)

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
        """summary.json: final metrics, best/peak values and timings."""
        rows = [r for r in self.rows if r["round"] > 0] or self.rows
        last = rows[-1] if rows else {}
        summary = {
            "rounds": len(rows),
            "final": last,
            "max_asr": max((r["asr"] for r in rows), default=None),
            "total_failures": sum(r.get("failures", 0) for r in rows),
            "wall_seconds": time.time() - self.started,
            **extra,
        }
        (self.out_dir / "summary.json").write_text(json.dumps(_clean(summary), indent=2) + "\n")
        return summary
