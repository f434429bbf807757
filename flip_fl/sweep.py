"""Grids of runs (e.g. defense x attack mode x seed) and their comparison table, CSV and plots.

A sweep file is YAML:

    base: quickstart.yaml            # optional run config, relative to the sweep file
    config: {federation: {num_rounds: 8}}   # optional keys merged over base
    grid:                            # key path -> list of values; a list of such mappings is a union
      defense.name: [fedavg, krum]
      attack.mode: [single_shot, continuous]
      seed: [0, 1]
    rows: [defense.name]             # optional: the keys that make a table row (default: defense.*, flip.*, clients.*)
    title: My comparison             # optional heading of results.md

A grid mapping may also carry `label: TEXT`, the row name of its runs (e.g. FLIP).
Every run is a subprocess `sim.py --config RUN/requested.yaml --output-dir RUN` under
`SWEEP_DIR/runs/<key=value__...>/`, so a crash or a watchdog abort ends one run, not the sweep; runs
go one at a time unless `jobs` > 1 (each has its own local Ray cluster). A run
whose directory holds summary.json is not rerun (its config must equal the requested one); a failed
run is rerun next time and shows as failed in the table until then.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from flip_fl.config import Config, apply_overrides, config_from_dict, read_yaml, to_yaml
from flip_fl.schema import ConfigError

SIM = Path(__file__).resolve().parents[1] / "sim.py"
SPEC_KEYS = {"base", "config", "grid", "rows", "title"}
ROW_PREFIXES = ("defense.", "flip.", "clients.")
RESULT_KEYS = ["clean_acc", "asr", "clean_acc_thresholded", "asr_thresholded", "clean_reject_rate",
               "backdoor_reject_rate"]


@dataclass
class Point:
    """One run of the grid: its overrides, run directory name, optional row label and resolved config."""

    overrides: dict[str, Any]
    name: str
    label: str | None
    cfg: Config


@dataclass
class Sweep:
    """A parsed sweep file: its points in grid order, row keys and title."""

    points: list[Point]
    row_keys: list[str]
    title: str
    spec: dict[str, Any] = field(default_factory=dict)


def _format(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _slug(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(_slug(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", _format(value))


def run_name(overrides: dict[str, Any]) -> str:
    """Directory name of a point: `key=value` pairs joined by `__`, filesystem-safe (lists as a+b)."""
    name = "__".join(f"{k}={_slug(v)}" for k, v in overrides.items()) or "base"
    if len(name) > 180:
        name = name[:160] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return name


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_path(raw: dict[str, Any], path: str, value: Any, where: str) -> None:
    parts = path.split(".")
    if not path or any(not p for p in parts):
        raise ConfigError(f"{where}: {path!r} is not a key path like defense.name")
    node = raw
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[:i + 1])} is not a section")
    node[parts[-1]] = value


def _grid_entries(grid: Any) -> list[dict[str, Any]]:
    entries = grid if isinstance(grid, list) else [grid]
    if not entries or not all(isinstance(e, dict) and e for e in entries):
        raise ConfigError("grid: expected a mapping of key path -> list of values, or a list of such mappings")
    for i, entry in enumerate(entries):
        where = f"grid[{i}]" if isinstance(grid, list) else "grid"
        label = entry.get("label")
        if label is not None and not isinstance(label, str):
            raise ConfigError(f"{where}.label: expected a string, got {label!r}")
        for key, values in entry.items():
            if key != "label" and (not isinstance(values, list) or not values):
                raise ConfigError(f"{where}.{key}: expected a non-empty list of values, got {values!r}")
    return entries


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Parse and validate a sweep file: every point's config is checked before anything runs."""
    path = Path(path)
    spec = read_yaml(path)
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key {unknown[0]!r}; valid keys: {', '.join(sorted(SPEC_KEYS))}")
    if "grid" not in spec:
        raise ConfigError(f"{path}: a sweep needs a grid (key path -> list of values)")
    raw: dict[str, Any] = {}
    if spec.get("base") is not None:
        base = Path(str(spec["base"]))
        raw = read_yaml(base if base.is_absolute() else path.parent / base)
    extra = spec.get("config") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"{path}: config: expected a mapping of config keys")
    raw = apply_overrides(_merge(raw, extra), list(overrides or []))
    points: dict[str, Point] = {}
    for entry in _grid_entries(spec["grid"]):
        keys = [k for k in entry if k != "label"]
        for values in itertools.product(*(entry[k] for k in keys)):
            point_overrides = dict(zip(keys, values))
            name = run_name(point_overrides)
            point_raw = json.loads(json.dumps(raw))
            for key, value in point_overrides.items():
                _set_path(point_raw, key, value, f"grid {key}")
            try:
                cfg = config_from_dict(point_raw)
            except ConfigError as err:
                raise ConfigError(f"run {name}: {err}") from None
            if name in points and points[name].overrides != point_overrides:
                raise ConfigError(f"grid: {points[name].overrides} and {point_overrides} would share the run "
                                  f"directory {name}; make the values distinguishable")
            points.setdefault(name, Point(point_overrides, name, entry.get("label"), cfg))
    varying = _varying_keys(list(points.values()))
    rows = spec.get("rows")
    if rows is not None and not (isinstance(rows, list) and all(isinstance(r, str) for r in rows)):
        raise ConfigError(f"{path}: rows: expected a list of key paths, got {rows!r}")
    row_keys = rows if rows is not None else [k for k in varying if k.startswith(ROW_PREFIXES)]
    return Sweep(list(points.values()), row_keys, str(spec.get("title") or f"Sweep {path.stem}"),
                 {**spec, "base": str((path.parent / spec["base"]).resolve()) if spec.get("base") else None,
                  "set": list(overrides or [])})


def _value(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _varying_keys(points: list[Point]) -> list[str]:
    keys = list(dict.fromkeys(k for p in points for k in p.overrides))
    return [k for k in keys if len({_format(_value(p.cfg, k)) for p in points}) > 1]


def _row_label(point: Point, row_keys: list[str]) -> str:
    if point.label:
        return point.label
    parts = [_format(_value(point.cfg, k)) if k == "defense.name" else f"{k}={_format(_value(point.cfg, k))}"
             for k in row_keys]
    return ", ".join(parts) or _format(point.cfg.defense.name)


def _column_labels(points: list[Point], row_keys: list[str]) -> dict[str, str]:
    """Column label per point: dataset / attack mode, plus other non-seed keys that these do not determine."""
    shown = ("data.name", "attack.mode")
    extra = [k for k in _varying_keys(points) if k not in row_keys and k not in shown and k != "seed"]
    needed = []
    for key in extra:
        seen: dict[tuple, set[str]] = {}
        for p in points:
            seen.setdefault(tuple(_value(p.cfg, k) for k in shown), set()).add(_format(_value(p.cfg, key)))
        if any(len(v) > 1 for v in seen.values()):
            needed.append(key)
    labels = {}
    for p in points:
        parts = [p.cfg.data.name, p.cfg.attack.mode] + [f"{k}={_format(_value(p.cfg, k))}" for k in needed]
        labels[p.name] = " / ".join(parts)
    return labels


# ---------------------------------------------------------------------------------------------- running


def finished_config(run_dir: Path) -> Config | None:
    """The config of a finished run in `run_dir` (None when it has not finished)."""
    if not (run_dir / "summary.json").is_file():
        return None
    try:
        return config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    except (OSError, ConfigError, yaml.YAMLError):
        return None


def check_finished(sweep: Sweep, sweep_dir: Path) -> None:
    """A finished run directory must hold the config its point asks for (else the table would lie)."""
    for point in sweep.points:
        run_dir = sweep_dir / "runs" / point.name
        if (run_dir / "summary.json").is_file() and finished_config(run_dir) != point.cfg:
            raise ConfigError(f"{run_dir}: a finished run with a different config is in the way; "
                              "delete it or choose another --output-dir")


def _error_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.is_file() else []
    errors = [line for line in lines if line.startswith("error")]
    return (errors or lines or ["no output"])[-1][:300]


def run_point(point: Point, run_dir: Path, ray_address: str | None) -> tuple[bool, str]:
    """Run one point as a `sim.py` subprocess; (ok, one-line outcome)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    requested = run_dir / "requested.yaml"
    requested.write_text(to_yaml(point.cfg))
    cmd = [sys.executable, str(SIM), "--config", str(requested), "--output-dir", str(run_dir)]
    if ray_address:
        cmd += ["--ray-address", ray_address]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
    with (run_dir / "log.txt").open("w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc == 130:
        raise KeyboardInterrupt
    if rc == 0 and (run_dir / "summary.json").is_file():
        final = json.loads((run_dir / "summary.json").read_text())["final"]
        return True, f"acc {final['clean_acc']:.4f} asr {final['asr']:.4f}"
    return False, f"exit {rc}: {_error_line(run_dir / 'log.txt')}"


def run_sweep(sweep: Sweep, sweep_dir: Path, ray_address: str | None = None, jobs: int = 1,
              echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every unfinished point (grid order, `jobs` at a time), then write the report; returns the result rows.

    With jobs > 1 the runs share the machine, so their timings (and the cost table) are not comparable.
    """
    if jobs < 1:
        raise ConfigError(f"--jobs: {jobs} must be at least 1")
    check_finished(sweep, sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(sweep.spec, sort_keys=False))
    total = len(sweep.points)
    todo = []
    for i, point in enumerate(sweep.points, 1):
        if finished_config(sweep_dir / "runs" / point.name) is not None:
            echo(f"[{i}/{total}] {point.name}: finished before, skipped")
        else:
            todo.append((i, point))
    lock = threading.Lock()

    def task(i: int, point: Point) -> None:
        with lock:
            echo(f"[{i}/{total}] {point.name}: running")
        start = time.time()
        ok, outcome = run_point(point, sweep_dir / "runs" / point.name, ray_address)
        with lock:
            echo(f"[{i}/{total}] {point.name}: {'done' if ok else 'FAILED'} in {time.time() - start:.1f}s, {outcome}")

    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        for future in as_completed([pool.submit(task, i, p) for i, p in todo]):
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        rows = write_report(sweep, sweep_dir)
    return rows


# ---------------------------------------------------------------------------------------------- results


def _read_rows(run_dir: Path) -> list[dict[str, Any]]:
    from flip_fl.plots import read_metrics

    return read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def run_result(point: Point, run_dir: Path) -> dict[str, Any]:
    """One CSV row: status, the final round's metrics, detection totals and timings of a run."""
    finished = (run_dir / "summary.json").is_file()
    status = "ok" if finished else ("failed" if run_dir.is_dir() else "not run")
    out: dict[str, Any] = {"status": status, "error": "" if status != "failed" else _error_line(run_dir / "log.txt")}
    rows = [r for r in _read_rows(run_dir) if r.get("round", 0) > 0]
    if not finished or not rows:
        return out
    summary = json.loads((run_dir / "summary.json").read_text())
    final = rows[-1]
    out.update({"rounds": final["round"], **{k: final.get(k) for k in RESULT_KEYS}, "max_asr": summary.get("max_asr")})
    counts = {k: sum(r.get(f"detection_{k}") or 0 for r in rows) for k in ("tp", "fp", "fn", "tn")}
    if any(f"detection_{k}" in r for r in rows for k in counts):
        out.update({f"detection_{k}": v for k, v in counts.items()})
        out["detection_precision"] = _ratio(counts["tp"], counts["tp"] + counts["fp"])
        out["detection_recall"] = _ratio(counts["tp"], counts["tp"] + counts["fn"])
    weights = [r["defense_attacker_weight"] for r in rows if r.get("defense_attacker_weight") is not None]
    out["attacker_weight"] = float(np.mean(weights)) if weights else None
    agg = [r["aggregation_seconds"] for r in rows if r.get("aggregation_seconds") is not None]
    out["aggregation_ms"] = 1000 * float(np.median(agg)) if agg else None
    out["round_seconds"] = float(np.median([r["seconds"] for r in rows]))
    out["wall_seconds"] = summary.get("wall_seconds")
    return out


def collect(sweep: Sweep, sweep_dir: Path) -> list[dict[str, Any]]:
    """The result row of every point (finished, failed or not run), in grid order."""
    columns = _column_labels(sweep.points, sweep.row_keys)
    keys = list(dict.fromkeys(k for p in sweep.points for k in p.overrides))
    results = []
    for point in sweep.points:
        run_dir = sweep_dir / "runs" / point.name
        results.append({"run": point.name, "row": _row_label(point, sweep.row_keys), "column": columns[point.name],
                        **{k: _format(_value(point.cfg, k)) for k in keys}, "seed": point.cfg.seed,
                        **run_result(point, run_dir)})
    return results


def _stat(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    arr = np.asarray(values, dtype=float) * scale
    if len(arr) == 1:
        return f"{arr[0]:.{digits}f}"
    return f"{arr.mean():.{digits}f} ± {arr.std(ddof=1):.{digits}f}"


def _cell(group: list[dict[str, Any]]) -> str:
    ok = [r for r in group if r["status"] == "ok"]
    failed = sum(r["status"] == "failed" for r in group)
    missing = sum(r["status"] == "not run" for r in group)
    if not ok:
        return "failed" if failed else "not run"
    text = (f"{_stat([r['clean_acc_thresholded'] for r in ok])} / "
            f"{_stat([r['asr_thresholded'] for r in ok])}")
    notes = [f"{failed} of {len(group)} failed"] * bool(failed) + [f"{missing} of {len(group)} not run"] * bool(missing)
    return text + (f" ({', '.join(notes)})" if notes else "")


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(c) + " |" for c in lines]


def markdown(sweep: Sweep, results: list[dict[str, Any]], plots: list[str]) -> str:
    """results.md: ACC / ASR table (rows defenses, columns dataset / attack), costs, detection, failures."""
    rows = list(dict.fromkeys(r["row"] for r in results))
    cols = list(dict.fromkeys(r["column"] for r in results))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["row"], r["column"]), []).append(r)
    seeds = sorted({r["seed"] for r in results})
    out = [f"# {sweep.title}", "",
           f"Cells: clean accuracy / ASR in % at the final round (thresholded when defense.threshold > 0), "
           f"mean ± sample std over seeds {seeds}.", ""]
    out += _table(["Defense"] + cols, [[row] + [_cell(groups.get((row, c), [])) if (row, c) in groups else "—"
                                                for c in cols] for row in rows])
    ok = [r for r in results if r["status"] == "ok"]
    cost: dict[str, tuple[float, float]] = {}
    for row in rows:
        mine = [r for r in ok if r["row"] == row and r.get("aggregation_ms") is not None]
        if mine:
            cost[row] = (float(np.mean([r["aggregation_ms"] for r in mine])),
                         float(np.mean([r["round_seconds"] for r in mine])))
    if cost:
        ref = cost.get("fedavg")
        out += ["", "## Server cost per round", "",
                "Aggregation: time of the aggregation rule on the server (median over a run's rounds); round: "
                "wall time of a whole round incl. client training and evaluation (median). Means over runs; "
                "ratios relative to fedavg in this sweep.", ""]
        out += _table(["Defense", "aggregation (ms)", "× fedavg", "round (s)", "× fedavg"],
                      [[row, f"{a:.2f}", f"{a / ref[0]:.1f}" if ref else "—", f"{s:.2f}",
                        f"{s / ref[1]:.2f}" if ref else "—"] for row, (a, s) in cost.items()])
    detected = [(row, col) for row in rows for col in cols
                if any(r.get("detection_tp") is not None or r.get("attacker_weight") is not None
                       for r in groups.get((row, col), []) if r["status"] == "ok")]
    if detected:
        out += ["", "## Detection", "",
                "Rejection of attacking clients, counts summed over rounds and seeds (precision = rejected "
                "attackers / rejected, recall = rejected attackers / attackers); attackers' weight = mean share "
                "of the aggregate given to attacking clients in attack rounds.", ""]
        lines = []
        for row, col in detected:
            group = [r for r in groups[(row, col)] if r["status"] == "ok"]
            tp, fp, fn = (sum(r.get(f"detection_{k}") or 0 for r in group) for k in ("tp", "fp", "fn"))
            has_counts = any(r.get("detection_tp") is not None for r in group)
            weights = [r["attacker_weight"] for r in group if r.get("attacker_weight") is not None]
            fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
            lines.append([row, col, fmt(_ratio(tp, tp + fp)) if has_counts else "—",
                          fmt(_ratio(tp, tp + fn)) if has_counts else "—",
                          fmt(float(np.mean(weights))) if weights else "—"])
        out += _table(["Defense", "column", "precision", "recall", "attackers' weight"], lines)
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        out += ["", "## Runs without results", ""]
        out += [f"- `runs/{r['run']}`: {r['status']}" + (f" — {r['error']}" if r["error"] else "") for r in failed]
    if plots:
        out += ["", "## Figures", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def _curves(sweep: Sweep, results: list[dict[str, Any]], sweep_dir: Path) -> list[str]:
    from flip_fl.plots import plot_comparison

    files = []
    for col in dict.fromkeys(r["column"] for r in results):
        curves: dict[str, dict[str, list[list[float]]]] = {}
        for r in results:
            if r["column"] != col or r["status"] != "ok":
                continue
            rows = _read_rows(sweep_dir / "runs" / r["run"])
            series = curves.setdefault(r["row"], {"acc": [], "asr": []})
            series["acc"].append([m["clean_acc_thresholded"] for m in rows])
            series["asr"].append([m["asr_thresholded"] for m in rows])
        if curves:
            name = "plot_" + re.sub(r"[^A-Za-z0-9._=+-]+", "_", col).strip("_") + ".png"
            plot_comparison(curves, sweep_dir / name, f"{sweep.title}: {col}")
            files.append(name)
    return files


def write_report(sweep: Sweep, sweep_dir: Path) -> list[dict[str, Any]]:
    """results.csv, results.md and one plot per column from whatever runs have finished."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    results = collect(sweep, sweep_dir)
    fields = list(dict.fromkeys(k for r in results for k in r))
    with (sweep_dir / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(results)
    plots = _curves(sweep, results, sweep_dir)
    (sweep_dir / "results.md").write_text(markdown(sweep, results, plots))
    return results
