"""Figures: what curves.png and the sweep comparison show, read back from the matplotlib Figure."""

from __future__ import annotations

from pathlib import Path

import pytest

from flip_fl.experiments.plots import comparison_figure, describe_run, plot_run, run_figure

CFG = {"seed": 3, "data": {"name": "synthetic"}, "model": {"name": "tiny_cnn"}, "federation": {"num_clients": 10},
       "attack": {"mode": "continuous", "trigger": "turner", "target_label": 2,
                  "num_malicious": 1},
       "defense": {"name": "fedavg", "threshold": 0.3},
       "roles": {"benign": "clients.FlipDefenseClient", "malicious": "clients.PoisonClient"}}


def rows(tau_rejects: float = 0.02) -> list[dict]:
    """Round 0 and two attack rounds; the model collapses onto the target in round 1 (ASR 1 without trigger too)."""
    return [{"round": r, "clean_acc": acc, "asr": asr, "asr_no_trigger": no_trigger, "clean_acc_thresholded": acc,
             "asr_thresholded": asr, "clean_reject_rate": rej, "backdoor_reject_rate": rej, "attack_round": r > 0}
            for r, acc, asr, no_trigger, rej in ((0, 0.9, 0.0, 0.0, 0.0), (1, 0.1, 1.0, 1.0, tau_rejects),
                                                  (2, 0.9, 0.3, 0.01, tau_rejects / 2))]


def legend(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_describe_run_names_dataset_model_attack_trigger_attackers_defense_and_seed():
    assert describe_run(CFG) == ("synthetic, tiny_cnn, attack PoisonClient continuous, trigger turner -> 2, "
                                 "1 attackers of 10 clients; defense fedavg, benign FlipDefenseClient, tau 0.3; seed 3")
    assert describe_run(CFG, defense_and_seed=False).endswith("1 attackers of 10 clients")
    clean = {**CFG, "attack": {"num_malicious": 0}}
    assert describe_run(clean).startswith("synthetic, tiny_cnn, no attack; ")


def test_curves_show_asr_without_trigger_thresholded_variants_attack_rounds_and_the_setting():
    fig = run_figure(rows(), CFG)
    main, rejection = fig.axes
    assert legend(main) == ["attack round", "clean accuracy", "ASR (triggered)", "ASR without trigger",
                            "clean accuracy @ tau 0.3", "ASR @ tau 0.3"]
    no_trigger = next(line for line in main.lines if line.get_label() == "ASR without trigger")
    assert list(no_trigger.get_ydata()) == [0.0, 1.0, 0.01]  # the collapsed round reads 1.0 here, not only in ASR
    assert "trigger turner" in main.get_title() and "seed 3" in main.get_title()
    assert legend(rejection) == ["clean rejected", "triggered rejected"]
    assert rejection.get_ylim()[1] == pytest.approx(0.05 * 1.15)  # a 2% rejection rate is not flattened on 0..1
    assert run_figure(rows(tau_rejects=0.6), CFG).axes[1].get_ylim()[1] == pytest.approx(0.69)


def test_curves_without_tau_have_one_panel_and_no_thresholded_lines(tmp_path: Path):
    import json

    import yaml

    cfg = {**CFG, "defense": {"name": "fedavg", "threshold": 0.0}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows()))
    assert plot_run(tmp_path).read_bytes()[:4] == b"\x89PNG"
    (main,) = run_figure(rows(), cfg).axes
    assert not any("tau" in text for text in legend(main))


def test_sweep_comparison_draws_rows_with_rejection_also_without_it():
    curves = {"no defense": {"acc": [[0.9, 0.8]], "asr": [[0.0, 0.6]], "asr_no_trigger": [[0.0, 0.0]]},
              "FLIP (tau 0.3)": {"acc": [[0.9, 0.85], [0.9, 0.87]], "asr": [[0.0, 0.1], [0.0, 0.2]],
                                 "asr_no_trigger": [[0.0, 0.0], [0.0, 0.0]], "acc_no_rejection": [[0.9, 0.88]] * 2,
                                 "asr_no_rejection": [[0.0, 0.3]] * 2}}
    fig = comparison_figure(curves, "title", attack_rounds=[1])
    acc, asr, _ = fig.axes
    assert legend(acc) == ["attack round", "no defense", "FLIP (tau 0.3)", "FLIP (tau 0.3), no rejection"]
    flip = next(line for line in asr.lines if line.get_label() == "FLIP (tau 0.3)")
    assert list(flip.get_ydata()) == pytest.approx([0.0, 0.15])  # mean over the two seeds
    raw = next(line for line in asr.lines if line.get_label() == "FLIP (tau 0.3), no rejection")
    assert list(raw.get_ydata()) == pytest.approx([0.0, 0.3])
