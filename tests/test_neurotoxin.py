"""Neurotoxin without Flower: the mask, the norm bound, the previous global model in the client state, and the
backdoor lifespan that summary.json reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from clients import NeurotoxinClient, NormBoundedClient
from clients.neurotoxin import PREVIOUS, neurotoxin_mask, num_masked, trained_names
from flip_fl.attacks.poisoning import update_norm
from flip_fl.config import Config, ConfigError
from flip_fl.data import client_dataset, load_datasets
from flip_fl.experiments.results import RunRecorder, backdoor_lifespan
from flip_fl.federation.checkpoint import RunState, load_checkpoint, save_checkpoint
from flip_fl.federation.client import ClientState, RoundInfo, check_client_config
from flip_fl.federation.protocol import fit_reply, take_state
from flip_fl.models import build_model
from tests.tiny import tiny_config

BASE = {
    "seed": 0,
    "data": {"name": "synthetic", "synthetic": {"train_size": 240, "test_size": 200}},
    "model": {"name": "tiny_cnn"},
    "federation": {"num_clients": 4, "clients_per_round": 4, "num_rounds": 3},
    "training": {"batch_size": 32, "lr": 0.05, "local_epochs": 1},
    "server": {"lr": 0.5, "weighted": False},
    "attack": {"malicious_ids": [0], "local_epochs": 2, "weight_decay": 0.0, "norm_bound": 100.0},
    "roles": {"malicious": "clients.NeurotoxinClient"},
}
CPU = torch.device("cpu")


def attacking(server_round: int = 2) -> RoundInfo:
    return RoundInfo(server_round=server_round, malicious=True, attacking=True, attacker_index=0)


def cfg(*overrides: str) -> Config:
    return tiny_config(*overrides, base=BASE)


def client(cls: type, c: Config, tmp_path: Path, state: ClientState | None = None):
    return cls(c, 0, client_dataset(c, 0), CPU, state if state is not None else ClientState(), tmp_path)


def global_state(c: Config) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return build_model(c.model, load_datasets(c)[0]).state_dict()


def flat(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([state[k].reshape(-1) for k in names])


def planted_direction(g: dict[str, torch.Tensor], names: list[str], percent: float) -> tuple[dict, torch.Tensor]:
    """A benign direction whose top `percent`% is a seeded set of coordinates, far above all others."""
    n = sum(g[k].numel() for k in names)
    rng = np.random.default_rng(7)
    top = torch.from_numpy(rng.choice(n, size=num_masked(n, percent), replace=False))
    d = torch.from_numpy(rng.uniform(0.0, 1e-4, n)).float()
    d[top] = torch.from_numpy(rng.uniform(1e-2, 2e-2, len(top))).float() * torch.sign(torch.randn(len(top)))
    out, start = {}, 0
    for k in names:
        out[k] = d[start:start + g[k].numel()].reshape(g[k].shape)
        start += g[k].numel()
    return out, top


def state_with_previous(previous: dict[str, torch.Tensor]) -> ClientState:
    return ClientState(arrays={PREVIOUS + k: v.float().numpy().copy() for k, v in previous.items()})


# ---------------------------------------------------------------- the mask


def test_num_masked_rounds_the_percentage_of_the_coordinates():
    assert [num_masked(100, p) for p in (5, 7, 0.5, 99.9)] == [5, 7, 1, 100]
    assert num_masked(10, 25) == 3 and num_masked(10, 24) == 2  # 2.5 rounds up, 2.4 down
    with pytest.raises(ValueError):
        num_masked(10, 100)


def test_mask_ranks_all_parameters_together_by_magnitude():
    direction = {"a": torch.tensor([[0.1, -5.0], [0.2, 0.0]]), "b": torch.tensor([3.0, -0.3, 4.0, 0.01])}
    mask = neurotoxin_mask(direction, 25)  # 2 of 8 coordinates: |-5| in a and |4| in b
    assert mask["a"].tolist() == [[True, False], [True, True]]
    assert mask["b"].tolist() == [True, True, False, True]
    assert all(m.dtype == torch.bool and m.shape == direction[k].shape for k, m in mask.items())


def test_trained_names_leave_out_buffers():
    assert trained_names(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))) == ["0.weight", "0.bias", "1.weight",
                                                                                 "1.bias"]


# ---------------------------------------------------------------- the attack's update


@pytest.mark.parametrize("eps", [100.0, 0.05], ids=["ball-not-reached", "projected"])
def test_attack_never_moves_the_top_k_coordinates_of_the_benign_direction(eps, tmp_path):
    c = cfg(f"attack.norm_bound={eps}")
    g = global_state(c)
    names = trained_names(build_model(c.model, load_datasets(c)[0]))
    direction, top = planted_direction(g, names, c.attack.neurotoxin_topk)
    previous = {k: g[k] - direction[k] for k in names}
    torch.manual_seed(0)
    result = client(NeurotoxinClient, c, tmp_path, state_with_previous(previous)).fit(g, attacking())
    update = flat(result.state, names) - flat(g, names)
    assert torch.equal(update[top], torch.zeros(len(top)))
    others = torch.ones(len(update), dtype=torch.bool)
    others[top] = False
    assert (update[others] != 0).float().mean() > 0.5  # it did train, elsewhere
    assert result.metrics["neurotoxin_estimate"] == 1.0
    assert result.metrics["neurotoxin_masked"] == pytest.approx(len(top) / len(update))
    # the control: plain PGD, same data and seed, moves those coordinates
    torch.manual_seed(0)
    pgd = client(NormBoundedClient, cfg(f"attack.norm_bound={eps}", "roles.malicious=clients.NormBoundedClient"),
                 tmp_path).fit(g, attacking())
    assert (flat(pgd.state, names)[top] != flat(g, names)[top]).float().mean() > 0.5


def test_update_respects_the_norm_bound(tmp_path):
    c = cfg("attack.norm_bound=0.05", "attack.project_every=3")
    g = global_state(c)
    result = client(NeurotoxinClient, c, tmp_path).fit(g, attacking())
    assert 0.99 * 0.05 <= update_norm(g, result.state) <= 0.05
    assert result.metrics["update_norm"] <= 0.05 and result.metrics["attacked"] == 1.0


def test_first_selection_masks_the_top_k_of_its_clean_gradient(tmp_path):
    c = cfg()
    g = global_state(c)
    attacker = client(NeurotoxinClient, c, tmp_path)
    model = attacker.model_from(g)
    names = trained_names(model)
    expected = neurotoxin_mask(attacker.clean_gradient(model, names), c.attack.neurotoxin_topk)
    torch.manual_seed(0)
    result = attacker.fit(g, attacking(1))
    masked = ~flat(expected, names)
    assert result.metrics["neurotoxin_estimate"] == 0.0 and int(masked.sum()) > 0
    assert torch.equal((flat(result.state, names) - flat(g, names))[masked], torch.zeros(int(masked.sum())))


def test_a_global_model_that_did_not_move_falls_back_to_the_clean_gradient(tmp_path):
    c = cfg()
    g = global_state(c)
    names = trained_names(build_model(c.model, load_datasets(c)[0]))
    result = client(NeurotoxinClient, c, tmp_path, state_with_previous({k: g[k] for k in names})).fit(g, attacking())
    assert result.metrics["neurotoxin_estimate"] == 0.0


def test_same_seed_same_update(tmp_path):
    c = cfg()
    g = global_state(c)
    a, b = (client(NeurotoxinClient, c, tmp_path).fit(g, attacking()) for _ in range(2))
    assert all(torch.equal(a.state[k], b.state[k]) for k in g)


def test_norm_bound_is_required():
    with pytest.raises(ConfigError, match=r"^attack.norm_bound: required by clients.NeurotoxinClient"):
        check_client_config(NeurotoxinClient, cfg("attack.norm_bound=null"), "roles.malicious")


# ---------------------------------------------------------------- the previous global model in the client state


def test_previous_global_survives_the_reply_and_a_checkpoint(tmp_path):
    c = cfg()
    g1 = global_state(c)
    names = trained_names(build_model(c.model, load_datasets(c)[0]))
    first = client(NeurotoxinClient, c, tmp_path)
    honest = first.fit(g1, RoundInfo(server_round=1, malicious=True, attacking=False, attacker_index=0))
    assert "neurotoxin_estimate" not in honest.metrics  # honest outside its attack rounds, but it remembers
    kept = take_state(fit_reply(honest, first.state))  # what the server keeps for the partition
    assert kept is not None
    save_checkpoint(tmp_path, RunState(1, {}, {}, {0: kept}), "seed: 0\n")
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None
    restored = loaded[0].clients[0]
    assert sorted(restored.arrays) == sorted(PREVIOUS + k for k in names)  # trained parameters only
    assert all(restored.arrays[PREVIOUS + k].dtype == np.float32 for k in names)
    assert all(np.array_equal(restored.arrays[PREVIOUS + k], g1[k].numpy()) for k in names)
    # the resumed attacker sees the global update g2 - g1 as the benign direction
    direction, top = planted_direction(g1, names, c.attack.neurotoxin_topk)
    g2 = {k: g1[k] + direction[k] if k in direction else g1[k] for k in g1}
    second = client(NeurotoxinClient, c, tmp_path, restored)
    result = second.fit(g2, attacking(2))
    assert result.metrics["neurotoxin_estimate"] == 1.0
    assert torch.equal((flat(result.state, names) - flat(g2, names))[top], torch.zeros(len(top)))
    assert all(np.array_equal(second.state.arrays[PREVIOUS + k], g2[k].numpy()) for k in names)


def test_a_stored_model_of_another_shape_counts_as_none(tmp_path):
    c = cfg()
    g = global_state(c)
    names = trained_names(build_model(c.model, load_datasets(c)[0]))
    wrong = state_with_previous({k: torch.zeros(3) for k in names})
    result = client(NeurotoxinClient, c, tmp_path, wrong).fit(g, attacking())
    assert result.metrics["neurotoxin_estimate"] == 0.0


# ---------------------------------------------------------------- lifespan


def rows(asrs: dict[int, float | None], attack_rounds: set[int]) -> list[dict]:
    return [{"round": r, "asr": a, "attack_round": r in attack_rounds} for r, a in sorted(asrs.items())]


def test_lifespan_counts_rounds_from_the_last_attack_until_asr_falls_below_the_threshold():
    asr = {0: 0.0, 1: 0.3, 2: 0.7, 3: 0.9, 4: 0.8, 5: 0.6, 6: 0.5, 7: 0.45, 8: 0.55, **{r: 0.2 for r in range(9, 14)}}
    out = backdoor_lifespan(rows(asr, {1, 2, 3}), 0.5)
    # 0.5 is not below 0.5; round 7 is the first below, 4 rounds after round 3; round 8's rebound does not count
    assert out == {"last_attack_round": 3, "asr_at_last_attack": 0.9, "lifespan": 4, "lifespan_threshold": 0.5,
                   "asr_10_after": 0.2}
    assert backdoor_lifespan(rows(asr, {1, 2, 3}), 0.3)["lifespan"] == 6


def test_lifespan_is_null_when_the_backdoor_outlives_the_run_and_asr_10_after_when_the_run_is_short():
    out = backdoor_lifespan(rows({0: 0.0, 1: 0.9, 2: 0.9, 3: 0.8, 4: 0.7}, {1, 2}), 0.5)
    assert out["last_attack_round"] == 2 and out["lifespan"] is None and out["asr_10_after"] is None


def test_lifespan_is_0_when_the_asr_is_already_below_the_threshold_at_the_last_attack():
    assert backdoor_lifespan(rows({1: 0.9, 2: 0.4, 3: 0.9}, {1, 2}), 0.5)["lifespan"] == 0


def test_lifespan_uses_the_last_round_any_attacker_attacked():
    asr = {1: 0.9, 2: 0.1, 3: 0.9, 4: 0.8, 5: 0.9, 6: 0.7, 7: None, 8: 0.3, **{r: 0.05 for r in range(9, 16)}}
    out = backdoor_lifespan(rows(asr, {1, 3, 5}), 0.5)  # per-attacker rounds: round 2's dip is before the end
    assert out["last_attack_round"] == 5 and out["lifespan"] == 3 and out["asr_10_after"] == 0.05


def test_no_attack_no_lifespan():
    out = backdoor_lifespan(rows({0: 0.1, 1: 0.9, 2: 0.1}, set()), 0.5)
    assert out["last_attack_round"] is None and out["lifespan"] is None and out["asr_10_after"] is None


def test_summary_reports_the_lifespan(tmp_path):
    recorder = RunRecorder(tmp_path, tiny_config("attack.lifespan_threshold=0.6"))
    for row in rows({0: 0.0, 1: 0.9, 2: 0.7, 3: 0.5}, {1}):
        recorder.record_round({**row, "failures": 0})
    recorder.write_summary({})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["last_attack_round"] == 1 and summary["lifespan"] == 2 and summary["lifespan_threshold"] == 0.6
    assert summary["asr_10_after"] is None and summary["asr_at_last_attack"] == 0.9
