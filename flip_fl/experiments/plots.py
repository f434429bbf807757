"""PNG figures (matplotlib, no display needed): a run's curves and a sweep's per-defense comparison."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml


def _figure(panels: int, width: float = 6.5, height: float = 3.0) -> Any:
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot state, no display

    fig = Figure(figsize=(width, height * panels), layout="constrained")
    return fig, [fig.add_subplot(panels, 1, i + 1) for i in range(panels)]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (a truncated last line is ignored)."""
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(run_dir: Path) -> Path:
    """Write a run's `curves.png`.

    Clean accuracy and ASR per round, rejection rates when tau > 0, and the defense's detection
    recall, precision and attackers' weight and share when it reports them. Attack rounds are shaded.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    tau = float(cfg.get("defense", {}).get("threshold", 0.0))
    detection = any("defense_clients" in r for r in rows)
    fig, axes = _figure(1 + (tau > 0) + detection)
    for ax in axes:
        for r in rows:
            if r.get("attack_round"):
                ax.axvspan(r["round"] - 0.5, r["round"] + 0.5, color="0.9", lw=0)
    ax = axes[0]
    ax.plot(*_series(rows, "clean_acc"), color="tab:blue", label="clean acc")
    ax.plot(*_series(rows, "asr"), color="tab:red", label="ASR")
    if tau > 0:
        ax.plot(*_series(rows, "clean_acc_thresholded"), "--", color="tab:blue", label=f"clean acc @ tau={tau:g}")
        ax.plot(*_series(rows, "asr_thresholded"), "--", color="tab:red", label=f"ASR @ tau={tau:g}")
        axes[1].plot(*_series(rows, "clean_reject_rate"), color="tab:blue", label="clean rejected")
        axes[1].plot(*_series(rows, "backdoor_reject_rate"), color="tab:red", label="triggered rejected")
        axes[1].set_ylabel("rejection rate")
    if detection:
        det = axes[-1]
        det.plot(*_series(rows, "detection_recall"), "o-", color="tab:green", label="attackers rejected (recall)")
        det.plot(*_series(rows, "detection_precision"), "s--", color="tab:olive", label="rejection precision")
        det.plot(*_series(rows, "defense_attacker_weight"), "^:", color="tab:purple", label="attackers' weight")
        det.plot(*_series(rows, "defense_attacker_share"), "v:", color="tab:red", label="attackers' share")
        det.set_ylabel("defense")
    axes[0].set_ylabel("rate")
    defense, mode = cfg.get("defense", {}).get("name", "?"), cfg.get("attack", {}).get("mode", "?")
    axes[0].set_title(f"defense {defense}, attack {mode}" + (f", tau {tau:g}" if tau > 0 else ""), fontsize=10)
    last = max((r["round"] for r in rows), default=1)
    for ax in axes:
        _round_axis(ax, last)
        if ax.lines:
            ax.legend(fontsize=7, loc="best")
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=110)
    return path


def plot_comparison(curves: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], path: Path, title: str) -> Path:
    """ASR and clean accuracy per round, one line per label (mean over seeds, band = +- std).

    `curves[label]["acc" | "asr"]` holds one per-round series (from round 0) per seed.
    """
    fig, (acc_ax, asr_ax) = _figure(2, width=7.5, height=3.4)
    for (color, style), (label, series) in zip(_styles(len(curves)), curves.items()):
        for ax, key in ((acc_ax, "acc"), (asr_ax, "asr")):
            runs = [np.asarray(s, dtype=float) for s in series[key] if len(s)]
            if not runs:
                continue
            length = min(len(s) for s in runs)
            stack = np.stack([s[:length] for s in runs])
            mean, std = stack.mean(axis=0), stack.std(axis=0)
            rounds = np.arange(length)
            ax.plot(rounds, mean, style, color=color, label=label)
            if len(runs) > 1:
                ax.fill_between(rounds, mean - std, mean + std, color=color, alpha=0.15, lw=0)
    acc_ax.set_title(textwrap.fill(title, 90), fontsize=9)
    acc_ax.set_ylabel("clean accuracy")
    asr_ax.set_ylabel("attack success rate")
    last = max((len(s) - 1 for series in curves.values() for runs in series.values() for s in runs), default=1)
    for ax in (acc_ax, asr_ax):
        _round_axis(ax, last)
    if acc_ax.lines:
        acc_ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.savefig(path, dpi=110)
    return path


def _round_axis(ax: Any, last: int) -> None:
    from matplotlib.ticker import MaxNLocator  # imported here: matplotlib is heavy and only plots need it

    ax.set_xlim(-0.3, max(last, 1) + 0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)


def _styles(n: int) -> list[tuple[Any, str]]:
    """Distinct (color, line style) pairs: the ten tab10 colors, solid first, then dashed, then dotted."""
    from matplotlib import colormaps  # imported here: matplotlib is heavy and only plots need it

    cmap = colormaps["tab10"]
    return [(cmap(i % 10), ("-", "--", ":")[(i // 10) % 3]) for i in range(n)]
