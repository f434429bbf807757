"""Per-round tables beside metrics.jsonl, fed the same row: metrics.csv, client_metrics.csv, TensorBoard scalars.

- `metrics.csv`: one flat row per round with typed columns: numbers stay numbers (empty = missing),
  `attack_round` is a bool in every row (False in round 0), id lists become `num_*` counts plus
  space-separated ids, the failure reasons one string; the nested `client_metrics` goes to
- `client_metrics.csv`: one row per sampled client per round (`round`, `partition`, `malicious`,
  `attacking`, `failed`, then the client's own metrics: `train_seconds`, FLIP's `invert_seconds`, ...).
- `tensorboard/`: with `results.tensorboard: true`, every numeric column of metrics.csv as a scalar
  at step = round (`tensorboard --logdir RUN_DIR`).

Both CSV files are appended round by round; when a round brings a column the file has not got yet, the file
is rewritten once with the wider header (rows kept in memory are small: one short dict per round).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from flip_fl.config import ConfigError

ID_LISTS = ("sampled", "malicious", "attacking", "failed")
ALWAYS = {"attack_round": False, "failures": 0, **{f"num_{k}": 0 for k in ID_LISTS}}


class RoundSink(Protocol):
    """Something that takes each round's metrics row (the one metrics.jsonl gets)."""

    def write(self, row: Mapping[str, Any]) -> None:
        """Take one round's row."""

    def close(self) -> None:
        """Flush and release files."""


def _cell(value: Any) -> Any:
    """A CSV cell: lists as space-separated values, non-finite floats and None as empty."""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


def flat_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One metrics.jsonl row as a flat CSV row (without `client_metrics`; failure reasons joined by `; `)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if key == "client_metrics" or isinstance(value, Mapping):
            continue
        if key == "errors":
            out[key] = "; ".join(value or [])
            continue
        if key in ID_LISTS:
            out[f"num_{key}"] = len(value or [])
        out[key] = _cell(value)
    for key, default in ALWAYS.items():
        out.setdefault(key, default)
    return out


def client_rows(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per sampled client of a round: its role, whether it failed, and its reported metrics."""
    metrics = row.get("client_metrics") or {}
    malicious, attacking, failed = (set(row.get(k) or []) for k in ("malicious", "attacking", "failed"))
    return [{"round": row["round"], "partition": p, "malicious": p in malicious, "attacking": p in attacking,
             "failed": p in failed, **{k: _cell(v) for k, v in sorted(metrics.get(str(p), {}).items())}}
            for p in sorted(row.get("sampled") or [])]


class CsvLog:
    """A CSV file appended row by row; rewritten with a wider header when a row brings new columns.

    Nothing is kept in memory but the header: a rewrite reads the rows back from the file. `keep_round`
    (a resumed run) keeps the file's rows up to that round (-1: none) instead of starting it empty.
    """

    def __init__(self, path: Path, keep_round: int | None = None) -> None:
        self.path = path
        self.columns: list[str] = []
        if keep_round is None or not path.is_file():
            path.write_text("")
            return
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            self.columns = list(reader.fieldnames or [])
            kept = [r for r in reader if r.get("round", "").isdigit() and int(r["round"]) <= keep_round]
        self._rewrite(kept)

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Add `rows` (flushed at once)."""
        if not rows:
            return
        new = [k for r in rows for k in r if k not in self.columns]
        if new:
            with self.path.open(newline="") as fh:
                old = list(csv.DictReader(fh)) if self.columns else []
            self.columns.extend(dict.fromkeys(new))
            self._rewrite([*old, *rows])
            return
        with self.path.open("a", newline="") as fh:
            self._writer(fh).writerows(rows)

    def _rewrite(self, rows: Sequence[Mapping[str, Any]]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", newline="") as fh:
            self._writer(fh, header=True).writerows(rows)
        os.replace(tmp, self.path)

    def _writer(self, fh: Any, header: bool = False) -> csv.DictWriter:
        writer = csv.DictWriter(fh, fieldnames=self.columns, restval="")
        if header:
            writer.writeheader()
        return writer


class RoundTables:
    """metrics.csv and client_metrics.csv of a run directory (a resumed run keeps its rows up to `resume_round`)."""

    def __init__(self, out_dir: Path, resume_round: int | None = None) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = CsvLog(out_dir / "metrics.csv", resume_round)
        self.clients = CsvLog(out_dir / "client_metrics.csv", resume_round)

    def write(self, row: Mapping[str, Any]) -> None:
        """Append the round to both tables."""
        self.metrics.append([flat_row(row)])
        self.clients.append(client_rows(row))

    def close(self) -> None:
        """Nothing to release (every row is flushed when written)."""


def check_tensorboard() -> None:
    """ConfigError unless the optional tensorboard package can be imported (checked before a run starts)."""
    try:
        import torch.utils.tensorboard  # noqa: F401  (the optional extra; imported only when asked for)
    except ImportError as err:
        raise ConfigError("results.tensorboard: needs the tensorboard package: pip install 'flip-fl[tensorboard]' "
                          f"({err})") from None


class TensorBoardLog:
    """Every numeric column of a round's flat row as a TensorBoard scalar (tag = column name, step = round)."""

    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # the optional extra: imported only when asked for

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, row: Mapping[str, Any]) -> None:
        """Add the round's scalars and flush (a run that dies keeps what it logged)."""
        step = int(row["round"])
        for key, value in flat_row(row).items():
            if key != "round" and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(key, float(value), global_step=step)
        self.writer.flush()

    def close(self) -> None:
        """Close the event file."""
        self.writer.close()
