"""A sweep's report: results.csv, the paper-style results.md and one comparison plot per column."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from flip_fl.evaluation.detection import precision_recall
from flip_fl.experiments.grid import ROW_PREFIXES, Point, Sweep, format_value, value_at, varying_keys
from flip_fl.experiments.plots import describe_run, plot_comparison, read_metrics
from flip_fl.tables import markdown_table, write_csv

RESULT_KEYS = ["clean_acc", "asr", "clean_acc_thresholded", "asr_thresholded", "clean_reject_rate",
               "backdoor_reject_rate"]


def _parts(point: Point, keys: list[str]) -> list[str]:
    """`key=value` of each key the point's config holds (a defense's parameters exist only for that defense)."""
    return [format_value(value) if k == "defense.name" else f"{k}={format_value(value)}"
            for k in keys if (value := value_at(point.cfg, k)) is not None]


def _telling_apart(points: list[Point], keys: list[str], group: dict[str, str]) -> list[str]:
    """The keys among `keys` whose value differs between points of one group (`group`: point name -> group)."""
    needed = []
    for key in keys:
        seen: dict[str, set[str]] = {}
        for p in points:
            seen.setdefault(group[p.name], set()).add(format_value(value_at(p.cfg, key)))
        if any(len(v) > 1 for v in seen.values()):
            needed.append(key)
    return needed


def _row_labels(points: list[Point], row_keys: list[str], columns: dict[str, str]) -> dict[str, str]:
    """Row label per point: its grid label, else its row keys' values, skipping keys its config does not hold.

    A defense setting (`defense.*`, `flip_defense.*`, `roles.benign`) that is not a row key but tells two runs
    of one cell apart is added to their labels (else they would be averaged as if they were seeds).
    """
    base = {p.name: p.label or ", ".join(_parts(p, row_keys)) or format_value(p.cfg.defense.name) for p in points}
    unlabelled = [p for p in points if not p.label]
    extra = [k for k in varying_keys(unlabelled) if k.startswith(ROW_PREFIXES) and k not in row_keys]
    needed = _telling_apart(unlabelled, extra, {p.name: base[p.name] + "\0" + columns[p.name] for p in unlabelled})
    return {p.name: base[p.name] if p.label else ", ".join([base[p.name], *_parts(p, needed)]) for p in points}


def _column_labels(points: list[Point], row_keys: list[str]) -> dict[str, str]:
    """Column label per point: dataset / attack mode, plus other non-seed keys that these do not determine.

    Defense settings (`defense.*`, `flip_defense.*`, `roles.benign`) never split columns: they describe the
    row, and each column keeps its undefended run for the cost ratios.
    """
    shown = ("data.name", "attack.mode")
    extra = [k for k in varying_keys(points)
             if k not in row_keys and k not in shown and k != "seed" and not k.startswith(ROW_PREFIXES)]
    needed = _telling_apart(points, extra, {p.name: format_value([value_at(p.cfg, k) for k in shown]) for p in points})
    return {p.name: " / ".join([p.cfg.data.name, p.cfg.attack.mode, *_parts(p, needed)]) for p in points}


def error_line(log: Path) -> str:
    """The last error line of a run's log (or its last line)."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error")]
    return (errors or lines or ["no output"])[-1][:300]


def _read_rows(run_dir: Path) -> list[dict[str, Any]]:
    return read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []


def run_result(point: Point, run_dir: Path) -> dict[str, Any]:
    """One CSV row: status, the final round's metrics, detection totals and timings of a run."""
    finished = (run_dir / "summary.json").is_file()
    status = "ok" if finished else ("failed" if run_dir.is_dir() else "not run")
    out: dict[str, Any] = {"status": status, "error": "" if status != "failed" else error_line(run_dir / "log.txt")}
    rows = [r for r in _read_rows(run_dir) if r.get("round", 0) > 0]
    if not finished or not rows:
        return out
    summary = json.loads((run_dir / "summary.json").read_text())
    final = rows[-1]
    out.update({"rounds": final["round"], **{k: final.get(k) for k in RESULT_KEYS}, "max_asr": summary.get("max_asr")})
    counts = {k: sum(r.get(f"detection_{k}") or 0 for r in rows) for k in ("tp", "fp", "fn", "tn")}
    if any(f"detection_{k}" in r for r in rows for k in counts):
        out.update({f"detection_{k}": v for k, v in counts.items()})
        out["detection_precision"], out["detection_recall"] = precision_recall(counts["tp"], counts["fp"], counts["fn"])
    for key in ("attacker_weight", "attacker_share"):
        values = [r[f"defense_{key}"] for r in rows if r.get(f"defense_{key}") is not None]
        out[key] = float(np.mean(values)) if values else None
    agg = [r["aggregation_seconds"] for r in rows if r.get("aggregation_seconds") is not None]
    out["aggregation_ms"] = 1000 * float(np.median(agg)) if agg else None
    out["round_seconds"] = float(np.median([r["seconds"] for r in rows]))
    out["wall_seconds"] = summary.get("wall_seconds")
    return out


def undefended(point: Point) -> bool:
    """Whether a run has no defense at all: plain FedAvg, benign clients that only train, no rejection."""
    cfg = point.cfg
    return cfg.defense.name == "fedavg" and cfg.defense.threshold == 0 and cfg.roles.benign == "clients.BenignClient"


def cost_lines(results: list[dict[str, Any]]) -> list[list[str]]:
    """The cost table: per row and column, aggregation ms and round seconds, each also as a multiple.

    The multiples are relative to the undefended run of the same column (same dataset and attack), so they are
    filled for every row even when the grid also varies `roles.benign`; means over seeds.
    """
    ok = [r for r in results if r["status"] == "ok" and r.get("aggregation_ms") is not None]
    means: dict[tuple[str, str], tuple[float, float]] = {}
    for key in dict.fromkeys((r["row"], r["column"]) for r in ok):
        mine = [r for r in ok if (r["row"], r["column"]) == key]
        means[key] = (float(np.mean([r["aggregation_ms"] for r in mine])),
                      float(np.mean([r["round_seconds"] for r in mine])))
    refs = {}
    for col in dict.fromkeys(r["column"] for r in ok):
        base = [r for r in ok if r["column"] == col and r["undefended"]]
        if base:
            refs[col] = (float(np.mean([r["aggregation_ms"] for r in base])),
                         float(np.mean([r["round_seconds"] for r in base])))
    lines = []
    for (row, col), (agg, sec) in means.items():
        ref = refs.get(col)
        lines.append([row, col, f"{agg:.2f}", f"{agg / ref[0]:.1f}" if ref else "no undefended run", f"{sec:.2f}",
                      f"{sec / ref[1]:.2f}" if ref else "no undefended run"])
    return lines


def collect(sweep: Sweep, sweep_dir: Path) -> list[dict[str, Any]]:
    """The result row of every point (finished, failed or not run), in grid order."""
    columns = _column_labels(sweep.points, sweep.row_keys)
    rows = _row_labels(sweep.points, sweep.row_keys, columns)
    keys = list(dict.fromkeys(k for p in sweep.points for k in p.overrides))
    results = []
    for point in sweep.points:
        run_dir = sweep_dir / "runs" / point.name
        results.append({"run": point.name, "row": rows[point.name], "column": columns[point.name],
                        **{k: format_value(value_at(point.cfg, k)) for k in keys}, "seed": point.cfg.seed,
                        "undefended": undefended(point), **run_result(point, run_dir)})
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
    out += markdown_table(["Defense"] + cols, [[row] + [_cell(groups.get((row, c), [])) if (row, c) in groups else "—"
                                                for c in cols] for row in rows])
    cost = cost_lines(results)
    if cost:
        out += ["", "## Server cost per round", "",
                "Aggregation: time of the aggregation rule on the server (median over a run's rounds); round: "
                "wall time of a whole round incl. client training and evaluation (median). Means over seeds; "
                "ratios relative to the undefended run (fedavg, benign clients.BenignClient, tau 0) of the same "
                "column.", ""]
        out += markdown_table(["Defense", "column", "aggregation (ms)", "× undefended", "round (s)", "× undefended"],
                              cost)
    detected = [(row, col) for row in rows for col in cols
                if any(r.get("detection_tp") is not None or r.get("attacker_weight") is not None
                       for r in groups.get((row, col), []) if r["status"] == "ok")]
    if detected:
        out += ["", "## Detection", "",
                "Rejection of attacking clients, counts summed over rounds and seeds (precision = rejected "
                "attackers / rejected, recall = rejected attackers / attackers; rounds a rule skipped are not "
                "counted); attackers' weight = mean weight the rule gave attacking clients in attack rounds, "
                "before clipping or rescaling; attackers' share = their mean share of the aggregate update "
                "itself, after clipping and rescaling (rules that combine whole updates).", ""]
        lines = []
        for row, col in detected:
            group = [r for r in groups[(row, col)] if r["status"] == "ok"]
            tp, fp, fn = (sum(r.get(f"detection_{k}") or 0 for r in group) for k in ("tp", "fp", "fn"))
            has_counts = any(r.get("detection_tp") is not None for r in group)
            means = {k: [r[k] for r in group if r.get(k) is not None] for k in ("attacker_weight", "attacker_share")}
            fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
            precision, recall = precision_recall(tp, fp, fn)
            lines.append([row, col, fmt(precision) if has_counts else "—", fmt(recall) if has_counts else "—",
                          *(fmt(float(np.mean(v))) if v else "—" for v in means.values())])
        out += markdown_table(["Defense", "column", "precision", "recall", "attackers' weight", "attackers' share"],
                              lines)
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        out += ["", "## Runs without results", ""]
        out += [f"- `runs/{r['run']}`: {r['status']}" + (f" — {r['error']}" if r["error"] else "") for r in failed]
    if plots:
        out += ["", "## Figures", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def _curves(sweep: Sweep, results: list[dict[str, Any]], sweep_dir: Path) -> list[str]:
    """One comparison plot per column: every row's clean accuracy, ASR and ASR without trigger per round.

    Rows with tau > 0 show their thresholded accuracy and ASR (as the table does), named with their tau,
    beside the same curves without rejection.
    """
    files = []
    for col in dict.fromkeys(r["column"] for r in results):
        curves: dict[str, dict[str, list[list[float]]]] = {}
        setting, attack_rounds = "", []
        for r in results:
            if r["column"] != col or r["status"] != "ok":
                continue
            run_dir = sweep_dir / "runs" / r["run"]
            rows, cfg = _read_rows(run_dir), yaml.safe_load((run_dir / "config.yaml").read_text())
            tau = float(cfg.get("defense", {}).get("threshold", 0.0))
            series = curves.setdefault(r["row"] + (f" (tau {tau:g})" if tau > 0 else ""), {})
            keys = [("acc", "clean_acc_thresholded"), ("asr", "asr_thresholded"), ("asr_no_trigger", "asr_no_trigger")]
            keys += [("acc_no_rejection", "clean_acc"), ("asr_no_rejection", "asr")] if tau > 0 else []
            for key, column in keys:
                series.setdefault(key, []).append([np.nan if m.get(column) is None else m[column] for m in rows])
            if not setting:
                setting = describe_run(cfg, defense_and_seed=False)
                attack_rounds = [m["round"] for m in rows if m.get("attack_round")]
        if curves:
            name = "plot_" + re.sub(r"[^A-Za-z0-9._=+-]+", "_", col).strip("_") + ".png"
            seeds = sorted({r["seed"] for r in results if r["column"] == col and r["status"] == "ok"})
            title = f"{sweep.title}: {col}. {setting}; seeds {seeds} (accuracy and ASR thresholded when tau > 0)"
            plot_comparison(curves, sweep_dir / name, title, attack_rounds)
            files.append(name)
    return files


def write_report(sweep: Sweep, sweep_dir: Path) -> list[dict[str, Any]]:
    """results.csv, results.md and one plot per column from whatever runs have finished."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    results = collect(sweep, sweep_dir)
    write_csv(sweep_dir / "results.csv", results)
    plots = _curves(sweep, results, sweep_dir)
    (sweep_dir / "results.md").write_text(markdown(sweep, results, plots))
    return results
