"""Attack clients and their evaluation without Flower: DBA pieces, model replacement, the L2 ball, paper configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import clients.poison as poison_module
import sim
from clients import BenignClient, ModelReplacementClient, NormBoundedClient, PoisonClient
from flip_fl.attacks.poisoning import model_replacement_scale, update_norm
from flip_fl.attacks.triggers import build_trigger
from flip_fl.config import Config, ConfigError, attack_schedule, load_config
from flip_fl.data import client_dataset, load_datasets
from flip_fl.defenses.updates import apply_server_lr
from flip_fl.evaluation.evaluator import GlobalEvaluator
from flip_fl.federation.client import ClientState, RoundInfo
from flip_fl.models import build_model
from tests.reference_rules import weighted_mean
from tests.tiny import tiny_config

BASE = {
    "seed": 0,
    "data": {"name": "synthetic", "synthetic": {"train_size": 240, "test_size": 200}},
    "model": {"name": "tiny_cnn"},
    "federation": {"num_clients": 4, "clients_per_round": 4, "num_rounds": 3},
    "training": {"batch_size": 32, "lr": 0.05, "local_epochs": 1},
    "server": {"lr": 0.5, "weighted": False},
    "attack": {"malicious_ids": [0], "trigger": "dba", "local_epochs": 2},
}
ATTACKING = RoundInfo(server_round=1, malicious=True, attacking=True, attacker_index=0)
CPU = torch.device("cpu")



def cfg(*overrides: str) -> Config:
    return tiny_config(*overrides, base=BASE)


def make_client(cls: type, c: Config, tmp_path: Path, partition_id: int = 0):
    return cls(c, partition_id, client_dataset(c, partition_id), CPU, ClientState(), tmp_path)


def global_state(c: Config) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return build_model(c.model, load_datasets(c)[0]).state_dict()


def fit(cls: type, c: Config, tmp_path: Path, info: RoundInfo = ATTACKING):
    torch.manual_seed(0)
    return make_client(cls, c, tmp_path).fit(global_state(c), info)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """PoisonClient's attack-round result under the base config (training is deterministic on CPU)."""
    return fit(PoisonClient, cfg(), tmp_path_factory.mktemp("plain"))


def delta(state: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(state[k] - base[k]).flatten() for k in base if base[k].is_floating_point()])


# ---------------------------------------------------------------- DBA pieces and the evaluation path


class PixelDetector(nn.Module):
    """Predicts `target` when every pixel of `mask` is white, else the class after it."""

    def __init__(self, mask: torch.Tensor, target: int) -> None:
        super().__init__()
        self.mask, self.target = mask, target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hit = (x[:, :, self.mask] >= 1.0).flatten(1).all(dim=1)
        label = torch.where(hit, self.target, (self.target + 1) % 10)
        return nn.functional.one_hot(label, 10).float() * 10.0


def evaluator(c: Config) -> GlobalEvaluator:
    return GlobalEvaluator(c, load_datasets(c)[1], CPU)


def test_asr_is_measured_on_non_target_images_with_the_union_of_the_pieces():
    c = cfg()
    ev = evaluator(c)
    trigger = build_trigger(c.attack, (1, 28, 28))
    assert trigger.num_pieces == 4
    union = torch.zeros(28, 28, dtype=torch.bool)
    for i in range(4):
        assert not (union & trigger.mask(piece=i)).any()
        union |= trigger.mask(piece=i)
    assert torch.equal(union, trigger.mask())

    out = ev.evaluate(PixelDetector(union, 2))
    assert out["asr"] == 1.0 and out["asr_no_trigger"] == 0.0  # the detector needs the trigger
    assert sorted(k for k in out if k.startswith("asr_piece")) == [f"asr_piece{i}" for i in range(4)]
    assert all(out[f"asr_piece{i}"] < 0.05 for i in range(4))  # one piece alone is not the global trigger


class TrueLabel(nn.Module):
    """Predicts each test image's true label, looked up by its pixels outside `ignore` (where the trigger goes)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, ignore: torch.Tensor) -> None:
        super().__init__()
        self.keep, self.labels = ~ignore, labels
        self.keys = images[:, :, self.keep].flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nearest = torch.cdist(x[:, :, self.keep].flatten(1), self.keys).argmin(dim=1)
        return nn.functional.one_hot(self.labels[nearest], 10).float() * 10.0


def test_target_class_images_are_not_in_the_asr_set():
    """A model that is always right predicts the target exactly on target-class images: ASR 0 if they are left out."""
    c = cfg()
    test = load_datasets(c)[1]
    assert (test.labels == 2).sum() > 0
    out = evaluator(c).evaluate(TrueLabel(*test.batch(slice(None)), build_trigger(c.attack, (1, 28, 28)).mask()))
    assert out["clean_acc"] == 1.0 and out["asr"] == 0.0


def test_asr_without_trigger_counts_class_confusion():
    """A model that answers the target for every image has ASR 1 with or without the trigger."""
    c = cfg()

    class AlwaysTarget(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.one_hot(torch.full((len(x),), 2), 10).float() * 10.0

    out = evaluator(c).evaluate(AlwaysTarget())
    assert out["asr"] == 1.0 and out["asr_no_trigger"] == 1.0


def test_each_piece_alone_is_measured():
    c = cfg()
    out = evaluator(c).evaluate(PixelDetector(build_trigger(c.attack, (1, 28, 28)).mask(piece=2), 2))
    assert out["asr"] == 1.0 and out["asr_piece2"] == 1.0
    assert all(out[f"asr_piece{i}"] < 0.05 for i in (0, 1, 3))


def test_a_single_trigger_has_no_piece_metrics():
    detector = PixelDetector(torch.ones(28, 28, dtype=torch.bool), 2)
    out = evaluator(cfg("attack.trigger=pixel_pattern")).evaluate(detector)
    assert not any(k.startswith("asr_piece") for k in out)


# ---------------------------------------------------------------- the poisoning client


def captured_training(monkeypatch, c: Config, tmp_path: Path, attacker_index: int) -> dict:
    """Run PoisonClient.fit with train_epochs replaced by a recorder of what it was given."""
    seen: dict = {}

    def fake_train_epochs(model, data, optimizer, **kwargs):
        seen.update(kwargs, optimizer=optimizer)
        return {"train_loss": 0.0, "train_steps": 0.0}

    monkeypatch.setattr(poison_module, "train_epochs", fake_train_epochs)
    info = RoundInfo(server_round=1, malicious=True, attacking=True, attacker_index=attacker_index)
    make_client(PoisonClient, c, tmp_path).fit(global_state(c), info)
    return seen


@pytest.mark.parametrize("attacker_index, piece", [(0, 0), (2, 2), (5, 1)])
def test_attacker_i_stamps_dba_piece_i_on_the_poisoned_share(monkeypatch, tmp_path, attacker_index, piece):
    c = cfg("attack.poison_fraction=0.3125", "attack.target_label=7")
    seen = captured_training(monkeypatch, c, tmp_path, attacker_index)
    trigger = build_trigger(c.attack, (1, 28, 28))
    x = torch.rand(64, 1, 28, 28) * 0.5
    y = torch.zeros(64, dtype=torch.int64)
    x2, y2 = seen["transform"](x, y)
    assert (y2[:20] == 7).all() and (y2[20:] == 0).all()
    assert torch.equal(x2[20:], x[20:])
    mine = trigger.mask(piece=piece)
    assert (x2[:20, :, mine] == 1.0).all()
    assert torch.equal(x2[:20, :, ~mine], x[:20, :, ~mine])


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_attacker_optimiser_epochs_and_lr_steps(monkeypatch, tmp_path):
    c = cfg("attack.local_epochs=10", "attack.lr=0.05", "attack.momentum=0.5", "attack.weight_decay=0.001",
            "attack.lr_milestones=[0.2, 0.8]")
    seen = captured_training(monkeypatch, c, tmp_path, 0)
    opt = seen["optimizer"]
    assert seen["epochs"] == 10
    assert opt.param_groups[0]["momentum"] == 0.5 and opt.param_groups[0]["weight_decay"] == 0.001
    lrs = []
    for epoch in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        seen["on_epoch_end"](epoch)
    assert lrs == pytest.approx([0.05] * 2 + [0.005] * 6 + [0.0005] * 2)


def test_outside_its_rounds_an_attacker_trains_honestly(tmp_path):
    c = cfg()
    info = RoundInfo(server_round=1, malicious=True, attacking=False, attacker_index=0)
    honest = fit(BenignClient, c, tmp_path, info)
    for cls in (PoisonClient, ModelReplacementClient, NormBoundedClient):
        c2 = cfg("roles.malicious=clients." + cls.__name__, "attack.norm_bound=0.01") if cls is NormBoundedClient else c
        out = fit(cls, c2, tmp_path, info)
        assert all(torch.equal(out.state[k], honest.state[k]) for k in honest.state), cls.__name__
        assert "attacked" not in out.metrics


def test_check_config_rejects_keys_a_class_ignores():
    with pytest.raises(ConfigError, match="attack.scale"):
        PoisonClient.check_config(cfg("attack.scale=3"))
    with pytest.raises(ConfigError, match="attack.norm_bound"):
        PoisonClient.check_config(cfg("attack.norm_bound=1.0"))
    with pytest.raises(ConfigError, match="attack.norm_bound"):
        NormBoundedClient.check_config(cfg())
    ModelReplacementClient.check_config(cfg("attack.scale=auto"))
    NormBoundedClient.check_config(cfg("attack.norm_bound=1.0"))


# ---------------------------------------------------------------- model replacement


@pytest.mark.parametrize("scale, gamma", [("auto", 8.0), ("3.0", 3.0)])
def test_model_replacement_scales_the_update(tmp_path, plain, scale, gamma):
    c = cfg(f"attack.scale={scale}")  # auto: 4 clients per round / server lr 0.5 = 8
    assert model_replacement_scale(c.federation.clients_per_round, c.server.lr) == 8.0
    base = global_state(c)
    scaled = fit(ModelReplacementClient, c, tmp_path)
    assert torch.allclose(delta(scaled.state, base), gamma * delta(plain.state, base), atol=1e-5)
    assert scaled.metrics["update_norm"] == pytest.approx(gamma * plain.metrics["update_norm"], rel=1e-5)
    assert scaled.metrics["update_norm"] == pytest.approx(update_norm(base, scaled.state))


def test_auto_scale_replaces_the_global_model_when_the_others_stand_still(tmp_path, plain):
    """Unweighted mean over 4 clients and eta 0.5: global + 0.5 * (8 d + 0 + 0 + 0) / 4 = global + d."""
    c = cfg("attack.scale=auto")
    base = {k: v.numpy() for k, v in global_state(c).items()}
    local = plain.state
    sent = {k: v.numpy() for k, v in fit(ModelReplacementClient, c, tmp_path).state.items()}
    new = apply_server_lr(base, weighted_mean([sent, base, base, base], [1, 1, 1, 1]), c.server.lr)
    for k, v in local.items():
        np.testing.assert_allclose(new[k], v.numpy(), atol=1e-5)


# ---------------------------------------------------------------- norm-bounded (PGD) attacker


@pytest.mark.parametrize("every", [1, 3])
def test_norm_bounded_update_stays_in_the_ball(tmp_path, plain, every):
    eps = plain.metrics["update_norm"] / 4
    c = cfg("roles.malicious=clients.NormBoundedClient", f"attack.norm_bound={eps}", f"attack.project_every={every}")
    out = fit(NormBoundedClient, c, tmp_path)
    norm = update_norm(global_state(c), out.state)
    assert norm <= eps and norm > 0.99 * eps
    assert out.metrics["update_norm"] == norm and out.metrics["attacked"] == 1.0


def test_norm_bounded_leaves_a_small_update_alone(tmp_path, plain):
    eps = 10 * plain.metrics["update_norm"]
    c = cfg("roles.malicious=clients.NormBoundedClient", f"attack.norm_bound={eps}", "attack.project_every=1000")
    out = fit(NormBoundedClient, c, tmp_path)
    assert all(torch.equal(out.state[k], plain.state[k]) for k in plain.state)


# ---------------------------------------------------------------- the papers' configs

PAPER = {  # dataset, image shape, model, benign epochs, attacker epochs, poisoned of 64, lr milestones, rounds,
    #         single-shot rounds, DBA lines as (row, first col, last col)
    "mnist": ("mnist", (1, 28, 28), "mnist_cnn", 1, 10, 20, [0.2, 0.8], 90, [2, 4, 6, 8],
              [(0, 0, 3), (0, 6, 9), (3, 0, 3), (3, 6, 9)]),
    "fashion_mnist": ("fashion_mnist", (1, 28, 28), "mnist_cnn", 1, 20, 20, [0.2, 0.8], 100, [2, 4, 6, 8],
                      [(0, 0, 3), (0, 6, 9), (3, 0, 3), (3, 6, 9)]),
    "cifar": ("cifar10", (3, 32, 32), "resnet18", 2, 6, 5, [], 100, [3, 5, 7, 9],
              [(0, 0, 5), (0, 9, 14), (4, 0, 5), (4, 9, 14)]),
}
SINGLE_SHOT = ["attack.mode=single_shot", "roles.malicious=clients.ModelReplacementClient", "attack.scale=100"]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_matches_the_setup_table(name):
    dataset, shape, model, epochs, attack_epochs, poisoned, milestones, rounds, _, lines = PAPER[name]
    c = load_config(f"configs/{name}.yaml")
    assert (c.data.name, c.data.partition, c.data.alpha, c.model.name) == (dataset, "dirichlet", 0.5, model)
    assert c.model.width == (0.5 if model == "resnet18" else 1.0)
    assert (c.federation.num_clients, c.federation.clients_per_round, c.federation.num_rounds) == (100, 10, rounds)
    assert (c.training.lr, c.training.momentum, c.training.weight_decay, c.training.batch_size,
            c.training.local_epochs) == (0.1, 0.9, 5e-4, 64, epochs)
    assert (c.server.lr, c.server.weighted, c.server.initial_model) == (0.1, False, f"runs/{name}_clean/final_model.pt")
    a = c.attack
    assert (c.roles.malicious, len(attack_schedule(c).malicious), a.target_label, a.trigger, a.trigger_args) == (
        "clients.PoisonClient", 4, 2, "dba", {})
    assert a.poison_fraction * 64 == poisoned
    assert (a.lr, a.momentum, a.weight_decay) == (0.05, 0.9, 5e-4)
    assert (a.local_epochs, a.lr_milestones) == (attack_epochs, milestones)
    assert (a.mode, a.force_sampled) == ("continuous", True)
    assert all(attack_schedule(c).attack_rounds(i) == set(range(1, rounds + 1)) for i in range(4))
    trigger = build_trigger(a, shape)
    for piece, (row, first, last) in enumerate(lines):
        expected = torch.zeros(shape[1:], dtype=torch.bool)
        expected[row, first:last + 1] = True
        assert torch.equal(trigger.mask(piece=piece), expected)
    stamped = trigger.apply(torch.zeros(1, *shape))
    assert int(stamped.sum()) == shape[0] * sum(last - first + 1 for _, first, last in lines)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_single_shot_switch_and_clean_step(name):
    rounds = PAPER[name][8]
    c = load_config(f"configs/{name}.yaml", [*SINGLE_SHOT, f"attack.rounds={rounds}"])
    assert [attack_schedule(c).attack_rounds(i) for i in range(4)] == [{r} for r in rounds]
    assert model_replacement_scale(c.federation.clients_per_round, c.server.lr) == c.attack.scale == 100
    ModelReplacementClient.check_config(c)
    clean = load_config(f"configs/{name}.yaml", ["attack.num_malicious=0", "server.initial_model=null",
                                                 "federation.num_rounds=10"])
    assert attack_schedule(clean).malicious == [] and clean.server.initial_model is None


def test_paper_config_without_data_fails_naming_data_root(capsys, tmp_path):
    assert sim.main(["--config", "configs/mnist.yaml", "--set", f"data.root={tmp_path}",
                     "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "data.root" in err and "mnist" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", ["synthetic_clean", "synthetic_continuous", "synthetic_single_shot"])
def test_synthetic_demo_configs_validate(name):
    c = load_config(f"configs/{name}.yaml")
    assert c.data.name == "synthetic" and c.attack.trigger == "dba"
    if name == "synthetic_single_shot":
        assert [attack_schedule(c).attack_rounds(i) for i in range(4)] == [{2}, {4}, {6}, {8}]
        assert model_replacement_scale(c.federation.clients_per_round, c.server.lr) == 100
