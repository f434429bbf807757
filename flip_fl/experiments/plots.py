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


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def describe_run(cfg: Mapping[str, Any], defense_and_seed: bool = True) -> str:
    """What a figure shows, from a run's config.yaml: dataset, model, attack, trigger, attackers, defense, seed.

    Without `defense_and_seed`: the setting a sweep's runs share (their defenses and seeds differ).
    """
    data, attack, defense = cfg.get("data", {}), cfg.get("attack", {}), cfg.get("defense", {})
    roles = cfg.get("roles", {})
    ids = attack.get("malicious_ids")
    attackers = (f"attackers {ids}" if ids else f"{attack.get('num_malicious', 0)} attackers")
    attackers += f" of {cfg.get('federation', {}).get('num_clients', '?')} clients"
    if not ids and not attack.get("num_malicious"):
        attack_text = "no attack"
    else:
        client = str(roles.get("malicious", "?")).rsplit(".", 1)[-1]
        attack_text = (f"attack {client} {attack.get('mode', '?')}, trigger {attack.get('trigger', '?')} -> "
                       f"{attack.get('target_label', '?')}, {attackers}")
    benign = str(roles.get("benign", "clients.BenignClient")).rsplit(".", 1)[-1]
    tau = float(defense.get("threshold", 0.0))
    parts = [f"defense {defense.get('name', '?')}"] + [f"benign {benign}"] * (benign != "BenignClient")
    parts += [f"tau {tau:g}"] * (tau > 0)
    setting = f"{data.get('name', '?')}, {cfg.get('model', {}).get('name', '?')}, {attack_text}"
    return f"{setting}; {', '.join(parts)}; seed {cfg.get('seed', '?')}" if defense_and_seed else setting


def shade_attack_rounds(axes: Sequence[Any], rounds: Sequence[int]) -> None:
    """Grey bands behind the attack rounds, named once in the first panel's legend."""
    for i, ax in enumerate(axes):
        for j, r in enumerate(rounds):
            ax.axvspan(r - 0.5, r + 0.5, color="0.88", lw=0, zorder=0,
                       label="attack round" if i == 0 and j == 0 else None)


def plot_run(run_dir: Path) -> Path:
    """Write a run's `curves.png`.

    Clean accuracy, ASR and ASR without the trigger (a model that predicts the target for everything has
    ASR 1 without any backdoor: the two curves together tell them apart) per round; with tau > 0 their
    thresholded variants and the rejection rates; the defense's detection recall / attackers' weight and share when
    it reports them. Attack rounds are shaded and named in the legend; the title names the setting.
    """
    run_dir = Path(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    path = run_dir / "curves.png"
    run_figure(read_metrics(run_dir), cfg).savefig(path, dpi=110)
    return path


def run_figure(rows: Sequence[Mapping[str, Any]], cfg: Mapping[str, Any]) -> Any:
    """The matplotlib Figure of `plot_run` from a run's metrics rows and its config (as a dict)."""
    rows = list(rows)
    tau = float(cfg.get("defense", {}).get("threshold", 0.0))
    detection = any("defense_clients" in r or "detection_recall" in r for r in rows)
    fig, axes = _figure(1 + (tau > 0) + detection, width=9.0, height=3.2)
    shade_attack_rounds(axes, [r["round"] for r in rows if r.get("attack_round")])
    ax = axes[0]
    ax.plot(*_series(rows, "clean_acc"), "o-", ms=3, color="tab:blue", label="clean accuracy")
    ax.plot(*_series(rows, "asr"), "o-", ms=3, color="tab:red", label="ASR (triggered)")
    ax.plot(*_series(rows, "asr_no_trigger"), "o:", ms=3, color="tab:orange", label="ASR without trigger")
    if tau > 0:
        ax.plot(*_series(rows, "clean_acc_thresholded"), "--", color="tab:blue", label=f"clean accuracy @ tau {tau:g}")
        ax.plot(*_series(rows, "asr_thresholded"), "--", color="tab:red", label=f"ASR @ tau {tau:g}")
        # the clean line solid and wide, the triggered one dashed over it: equal rates show both
        axes[1].plot(*_series(rows, "clean_reject_rate"), "o-", ms=3, lw=2.5, color="tab:blue", label="clean rejected")
        axes[1].plot(*_series(rows, "backdoor_reject_rate"), "s--", ms=3, lw=1.2, color="tab:red",
                     label="triggered rejected")
        axes[1].set_ylabel("rejection rate")
    if detection:
        det = axes[-1]
        det.plot(*_series(rows, "detection_recall"), "o-", color="tab:green", label="attackers rejected (recall)")
        det.plot(*_series(rows, "detection_precision"), "s--", color="tab:olive", label="rejection precision")
        det.plot(*_series(rows, "defense_attacker_weight"), "^:", color="tab:purple", label="attackers' weight")
        det.plot(*_series(rows, "defense_attacker_share"), "v:", color="tab:red", label="attackers' share")
        det.set_ylabel("defense")
    axes[0].set_ylabel("rate")
    axes[0].set_title(textwrap.fill(describe_run(cfg), 95), fontsize=8)
    last = max((r["round"] for r in rows), default=1)
    for ax in axes:
        _round_axis(ax, last)
        if ax.lines:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if tau > 0:
        _rejection_scale(axes[1], rows)
    return fig


def _rejection_scale(ax: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Scale the rejection panel to the rates of the trained rounds (1, 2, ...).

    Rejection rates of a few percent are the cost a researcher weighs: they must not be flattened on 0..1.
    Round 0's untrained model is unsure of everything and rejects nearly all inputs at tau > 0; a rate
    beyond the scale (round 0's, as a rule) is written in the panel instead.
    """
    keys = ("clean_reject_rate", "backdoor_reject_rate")
    trained = [r for r in rows if r.get("round", 0) > 0] or list(rows)
    rates = [v for key in keys for v in _series(trained, key)[1]]
    top = min(1.0, max([0.05, *rates]) * 1.15)
    ax.set_ylim(-top * 0.03, top)
    above = [(r["round"], key, r[key]) for r in rows for key in keys if r.get(key) is not None and r[key] > top]
    if above:
        text = "; ".join(f"round {n} {key.split('_')[0].replace('backdoor', 'triggered')} {value:.0%}"
                         for n, key, value in above[:4])
        ax.text(0.01, 0.97, f"off scale: {text}", transform=ax.transAxes, fontsize=7, va="top")


def plot_comparison(curves: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], path: Path, title: str,
                    attack_rounds: Sequence[int] = ()) -> Path:
    """Write `comparison_figure(curves, title, attack_rounds)` to `path`."""
    comparison_figure(curves, title, attack_rounds).savefig(path, dpi=110)
    return path


def comparison_figure(curves: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], title: str,
                      attack_rounds: Sequence[int] = ()) -> Any:
    """Clean accuracy, ASR and ASR without the trigger per round, one line per label (mean over seeds, band = +- std).

    `curves[label]["acc" | "asr" | "asr_no_trigger"]` holds one per-round series (from round 0) per seed;
    a label whose runs reject low-confidence predictions (tau > 0) gives its thresholded accuracy and ASR
    there and may add `"acc_no_rejection"` / `"asr_no_rejection"`, drawn thin and light in the same panels (what
    the model itself does, before the server's rejection). `attack_rounds` are shaded and named in the legend.
    """
    panels = [("acc", "clean accuracy"), ("asr", "ASR (triggered)"), ("asr_no_trigger", "ASR without trigger")]
    fig, axes = _figure(len(panels), width=9.0, height=2.8)
    shade_attack_rounds(axes, attack_rounds)
    for (color, style), (label, series) in zip(_styles(len(curves)), curves.items()):
        for ax, (key, _) in zip(axes, panels):
            _mean_and_band(ax, series.get(key, []), color, style, label)
            _mean_and_band(ax, series.get(f"{key}_no_rejection", []), color, style, f"{label}, no rejection",
                           light=True)
    axes[0].set_title(textwrap.fill(title, 100), fontsize=8)
    for ax, (_, name) in zip(axes, panels):
        ax.set_ylabel(name, fontsize=8)
    last = max((len(s) - 1 for series in curves.values() for runs in series.values() for s in runs), default=1)
    for ax in axes:
        _round_axis(ax, last)
    if axes[0].lines:
        axes[0].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _mean_and_band(ax: Any, series: Sequence[Sequence[float]], color: Any, style: str, label: str,
                   light: bool = False) -> None:
    """The mean over seeds of per-round series, and a +- std band when there are several."""
    runs = [np.asarray(s, dtype=float) for s in series if len(s)]
    if not runs:
        return
    length = min(len(s) for s in runs)
    stack = np.stack([s[:length] for s in runs])
    mean, std = stack.mean(axis=0), stack.std(axis=0)
    rounds = np.arange(length)
    ax.plot(rounds, mean, style, color=color, label=label, lw=0.9 if light else 1.5, alpha=0.45 if light else 1.0)
    if len(runs) > 1 and not light:
        ax.fill_between(rounds, mean - std, mean + std, color=color, alpha=0.15, lw=0)


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
