"""The command line's input contract: every bad input is exit code 2 with exactly one stderr line naming the
key, file or value, no traceback, found before Ray starts, within seconds.

One catalogue of bad inputs: config keys at every level, files (configs, client modules, model files, label
stage outputs), flags, and the `sweep` and `labels` subcommands. Most cases call `cli.main(argv)` in this
process (Ray, the sweep's runs and the label stages are replaced by tripwires: reaching them fails the
test); a handful run `sim.py` as a user would, in a subprocess (marked e2e), started together in the
background when the first of them is needed.

"Within seconds" is measured in CPU seconds (user + system) of the code under test, not wall time: on an
idle 2-core machine a subprocess case takes about 5 s of wall time (mostly importing torch), but a loaded
CI machine can stretch that past any fixed bound without the command doing more work.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from flip_fl.experiments import cli
from flip_fl.models import create_model
from tests.tiny import TINY

ROOT = Path(__file__).resolve().parents[1]
SWEEP_BASE = {"base": "base.yaml", "grid": {"defense.name": ["fedavg"]}}


class Evil:
    """Unpickling this would run a shell command: the initial model loader must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def write_workspace(root: Path) -> None:
    """Every file the catalogue names, in one directory (the working directory of every case)."""
    files = {
        "base.yaml": yaml.safe_dump(TINY),
        "dup_top.yaml": "seed: 1\nfederation: {num_rounds: 2}\nseed: 2\n",
        "dup_nested.yaml": "training:\n  lr: 0.1\n  batch_size: 8\n  lr: 0.2\n",
        "list.yaml": "- seed\n- 1\n",
        "broken.yaml": "training: {lr: 0.1\nseed: 3\n",
        "nul.yaml": "seed: 1\n\x00\n",
        "deep.yaml": "seed: " + "[" * 20000 + "]" * 20000 + "\n",
        "bomb.yaml": "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")),
        "raises_on_import.py": "raise RuntimeError('cannot reach the licence server')\n",
        "bad_syntax.py": "class Client(:\n    pass\n",
        "exits_on_import.py": "import sys\nsys.exit(3)\n",
        "my_clients.py": ("from abc import abstractmethod\nfrom clients import BenignClient\n"
                          "from flip_fl.federation.client import BaseClient\n"
                          "class Abstract(BaseClient):\n    pass\n"
                          "class CheckRaises(BenignClient):\n    @classmethod\n    def check_config(cls, cfg):\n"
                          "        raise ValueError('no such option')\n"),
        "text.pt": "this is not a model\n",
        "occupied.txt": "a file where a directory should go\n",
        "sweep_nogrid.yaml": "base: base.yaml\n",
        "sweep_unknown.yaml": "base: base.yaml\ngrids: {seed: [0]}\n",
        "sweep_notlist.yaml": "base: base.yaml\ngrid: {defense.name: krum}\n",
        "sweep_badpoint.yaml": "base: base.yaml\ngrid: {defense.name: [fedavg, nope]}\n",
        "sweep_rows.yaml": "base: base.yaml\ngrid: {seed: [0]}\nrows: defense.name\n",
        "sweep_nobase.yaml": "base: nothere.yaml\ngrid: {seed: [0]}\n",
        "sweep_dup.yaml": "base: base.yaml\ngrid: {seed: [0]}\ngrid: {seed: [1]}\n",
        "sweep_ok.yaml": yaml.safe_dump(SWEEP_BASE),
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "big.yaml").write_bytes(b"# " + b"x" * 10_000_100 + b"\n")
    (root / "evil.pt").write_bytes(pickle.dumps(Evil()))
    torch.save([torch.ones(2)], root / "list.pt")
    model = create_model("tiny_cnn", 10, 1, 28)
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                for k, v in model.state_dict().items()}, root / "nan.pt")
    torch.save(create_model("mnist_cnn", 10, 1, 28).state_dict(), root / "wrong.pt")


def run_(*sets: str) -> list[str]:
    """`--config base.yaml --set ...` for each item."""
    return ["--config", "base.yaml", *[a for s in sets for a in ("--set", s)]]


# (id, argv, what the one stderr line must contain); argv runs in the workspace
CATALOGUE: list[tuple[str, list[str], str]] = [
    # ---- top-level keys
    ("unknown top key", run_("nonsense=1"), "nonsense: unknown key"),
    ("negative seed", run_("seed=-1"), "seed: -1 is out of range"),
    ("seed beyond 2^63", run_("seed=9223372036854775808"), "seed: 9223372036854775808 does not fit"),
    ("fractional seed", run_("seed=1.5"), "seed: expected an integer, got 1.5"),
    # ---- data
    ("unknown dataset", run_("data.name=imagenet"),
     "data.name: unknown dataset 'imagenet'; choose one of synthetic, digits"),
    ("dirichlet without alpha", run_("data.partition=dirichlet"), "data.alpha: required"),
    ("alpha leaves clients empty", run_("data.partition=dirichlet", "data.alpha=0.0001", "federation.num_clients=20"),
     "data.alpha: 0.0001 leaves some of 20 clients without data"),
    ("NaN alpha", run_("data.partition=dirichlet", "data.alpha=.nan"), "data.alpha: nan is not a finite number"),
    ("two channels", run_("data.synthetic.channels=2"), "data.synthetic.channels: 2 is not allowed"),
    ("dataset too large", run_("data.synthetic.train_size=100000000000"),
     "data.synthetic.train_size: 100000000000 images of 1x28x28 need about"),
    ("dataset too large for the stated memory", run_("data.synthetic.train_size=200000", "resources.memory_gb=0.01"),
     "raise resources.memory_gb on purpose"),
    ("infinite noise", run_("data.synthetic.noise=.inf"), "data.synthetic.noise: inf is not a finite number"),
    ("too few images", run_("data.synthetic.train_size=5"), "data.synthetic.train_size: 5 is out of range"),
    ("more clients than images", run_("federation.num_clients=3000"), "data.synthetic.train_size: 2400 images cannot"),
    ("torchvision files missing", run_("data.name=mnist", "data.root=/nonexistent/flipfl"),
     "data.root: no mnist files found"),
    # ---- model
    ("unknown model", run_("model.name=vgg"), "model.name: unknown model 'vgg'; choose one of tiny_cnn"),
    ("infinite width", run_("model.width=.inf"), "model.width: inf is not a finite number"),
    ("width without resnet18", run_("model.width=0.5"), "model.width: only resnet18"),
    # ---- federation
    ("no clients", run_("federation.num_clients=0"), "federation.num_clients: 0 is out of range"),
    ("sample beyond clients", run_("federation.clients_per_round=7"), "federation.clients_per_round: 7 exceeds"),
    ("fractional rounds", run_("federation.num_rounds=2.5"), "federation.num_rounds: expected an integer"),
    ("rounds beyond 2^63", run_("federation.num_rounds=9223372036854775808"),
     "federation.num_rounds: 9223372036854775808 does not fit"),
    # ---- client classes (the module is imported before Ray)
    ("class path without module", run_("roles.benign=NoDots"), "roles.benign: 'NoDots' is not a dotted path"),
    ("client module missing", run_("roles.benign=nowhere.Client"), "roles.benign: cannot import module 'nowhere'"),
    ("client module raises", run_("roles.benign=raises_on_import.Client"),
     "roles.benign: importing module 'raises_on_import' raised RuntimeError: cannot reach the licence server"),
    ("client module syntax error", run_("roles.benign=bad_syntax.Client"),
     "roles.benign: importing module 'bad_syntax' raised SyntaxError"),
    ("client module exits", run_("roles.benign=exits_on_import.Client"),
     "roles.benign: importing module 'exits_on_import' raised SystemExit"),
    ("client class missing", run_("roles.benign=clients.Missing"), "module 'clients' has no class 'Missing'"),
    ("not a client class", run_("roles.benign=flip_fl.config.Config"), "roles.benign: flip_fl.config.Config does"),
    ("abstract client class", run_("roles.benign=my_clients.Abstract"), "roles.benign: my_clients.Abstract is abs"),
    ("check_config raises", run_("attack.num_malicious=1", "roles.malicious=my_clients.CheckRaises"),
     "roles.malicious: CheckRaises.check_config raised ValueError: no such option"),
    # ---- client training
    ("infinite lr", run_("training.lr=.inf"), "training.lr: inf is not a finite number"),
    ("NaN lr", run_("training.lr=.nan"), "training.lr: nan is not a finite number"),
    ("zero lr", run_("training.lr=0"), "training.lr: 0.0 is out of range"),
    ("momentum 1", run_("training.momentum=1"), "training.momentum: 1.0 is out of range"),
    ("zero batch", run_("training.batch_size=0"), "training.batch_size: 0 is out of range"),
    ("zero max batches", run_("training.max_batches=0"), "training.max_batches: 0 is out of range"),
    ("text lr", run_("training.lr=fast"), "training.lr: expected a number, got 'fast'"),
    # ---- server
    ("negative server lr", run_("server.lr=-1"), "server.lr: -1.0 is out of range"),
    ("infinite server lr", run_("server.lr=.inf"), "server.lr: inf is not a finite number"),
    ("min clients 0", run_("server.min_clients=0"), "server.min_clients: 0 must be between 1"),
    ("min clients fraction above 1", run_("server.min_clients=1.5"), "server.min_clients: 1.5 must be a count"),
    ("min clients above the sample", run_("server.min_clients=9"), "server.min_clients: 9 must be between 1 and"),
    ("min clients boolean", run_("server.min_clients=true"), "server.min_clients: expected int or float, got True"),
    ("initial model missing", run_("server.initial_model=missing.pt"), "server.initial_model: file not found"),
    ("initial model is text", run_("server.initial_model=text.pt"), "server.initial_model: text.pt is not a PyTorch"),
    ("initial model is a pickle", run_("server.initial_model=evil.pt"),
     "server.initial_model: evil.pt is not a tensors-only PyTorch file; refused"),
    ("initial model is a list", run_("server.initial_model=list.pt"), "list.pt holds a list, not a state_dict"),
    ("initial model NaN", run_("server.initial_model=nan.pt"), "nan.pt has non-finite values (NaN or inf) in"),
    ("initial model other architecture", run_("server.initial_model=wrong.pt"),
     "server.initial_model: wrong.pt does not fit model.name=tiny_cnn"),
    ("initial model is a directory", run_("server.initial_model=."), "server.initial_model: . is not a regular file"),
    # ---- attack
    ("too many attackers", run_("attack.num_malicious=30"), "attack.num_malicious: 30 exceeds"),
    ("attacker ids out of range", run_("attack.malicious_ids=[0, 9]"), "attack.malicious_ids: [9] are not partition"),
    ("target beyond classes", run_("attack.target_label=10"), "attack.target_label: 10 is not a class"),
    ("attack after the last round", run_("attack.num_malicious=1", "attack.start_round=9"),
     "attack.start_round: 9 is after the last round"),
    ("no poison", run_("attack.num_malicious=1", "attack.poison_fraction=0"), "attack.poison_fraction: 0.0 is out"),
    ("NaN scale", run_("attack.scale=.nan"), "attack.scale: nan is not a finite number"),
    ("unknown trigger", run_("attack.trigger=star"),
     "attack.trigger: unknown trigger 'star'; choose one of pixel_pattern"),
    ("trigger size as text", run_("attack.trigger_args={size: big}"), "attack.trigger_args: size must be an integer"),
    ("NaN in trigger args", run_("attack.trigger_args={alpha: .nan}"),
     "attack.trigger_args.alpha: nan is not a finite number"),
    ("trigger args alias bomb", run_("attack.trigger_args={a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], "
                                     "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a], "
                                     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b], "
                                     "d: [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]}"),
     "attack.trigger_args.d: more than 10000 values"),
    ("milestone beyond training", run_("attack.lr_milestones=[1.5]"), "attack.lr_milestones: [1.5] must be fractions"),
    ("infinite norm bound", run_("attack.norm_bound=.inf"), "attack.norm_bound: inf is not a finite number"),
    ("neurotoxin masks nothing", run_("attack.neurotoxin_topk=0"), "attack.neurotoxin_topk: 0.0 is out of range"),
    ("neurotoxin masks everything", run_("attack.neurotoxin_topk=100"), "attack.neurotoxin_topk: 100.0 is out of"),
    ("lifespan threshold 0", run_("attack.lifespan_threshold=0"), "attack.lifespan_threshold: 0.0 is out of range"),
    # ---- defense
    ("unknown defense", run_("defense.name=trimmed"),
     "defense.name: unknown defense 'trimmed'; choose one of alignins, bulyan, "),
    ("krum beyond its bound", run_("defense.name=krum", "attack.num_malicious=1", "defense.krum.num_malicious=1"),
     "defense.krum.num_malicious: krum needs federation.clients_per_round >= 2f + 3 = 5 for f = 1"),
    ("multikrum beyond its bound", run_("defense.name=multikrum", "defense.multikrum.num_malicious=2"),
     "defense.multikrum.num_malicious: multikrum needs federation.clients_per_round >= 2f + 3 = 7"),
    ("bulyan beyond its bound", run_("defense.name=bulyan", "defense.bulyan.num_malicious=1"),
     "defense.bulyan.num_malicious: bulyan needs federation.clients_per_round >= 4f + 3 = 7"),
    ("unknown bulyan selection", run_("defense.bulyan.selection=twice"), "defense.bulyan.selection: 'twice' is not"),
    ("trim half", run_("defense.trimmed_mean.beta=0.5"), "defense.trimmed_mean.beta: 0.5 is out of range"),
    ("infinite clip", run_("defense.norm_clip.clip_norm=.inf"), "defense.norm_clip.clip_norm: inf is not a finite"),
    ("NaN noise", run_("defense.weak_dp.noise_std=.nan"), "defense.weak_dp.noise_std: nan is not a finite"),
    ("multikrum selects too many", run_("defense.name=multikrum", "defense.multikrum.num_selected=9"),
     "defense.multikrum.num_selected: 9 exceeds"),
    ("rlr threshold too high", run_("defense.name=rlr", "defense.rlr.threshold=9"), "defense.rlr.threshold: 9 exceeds"),
    ("fltrust root too large", run_("defense.name=fltrust", "defense.fltrust.root_size=300"),
     "defense.fltrust.root_size: 300 server images"),
    ("deepsight cluster beyond a round", run_("defense.name=deepsight", "defense.deepsight.min_cluster_size=5"),
     "defense.deepsight.min_cluster_size: 5 exceeds federation.clients_per_round (4)"),
    ("deepsight tau 0", run_("defense.deepsight.tau=0"), "defense.deepsight.tau: 0.0 is out of range"),
    ("deepsight no samples", run_("defense.deepsight.num_samples=0"), "defense.deepsight.num_samples: 0 is out of"),
    ("fldetector empty window", run_("defense.fldetector.window=0"), "defense.fldetector.window: 0 is out of range"),
    ("fldetector unknown aggregation", run_("defense.fldetector.aggregation=krum"),
     "defense.fldetector.aggregation: 'krum' is not allowed"),
    ("alignins top-k empty", run_("defense.alignins.sparsity=0"), "defense.alignins.sparsity: 0.0 is out of range"),
    ("alignins negative bound", run_("defense.alignins.lambda_s=-1"), "defense.alignins.lambda_s: -1.0 is out of"),
    ("flare server data too large", run_("defense.name=flare", "defense.flare.root_size=300"),
     "defense.flare.root_size: 300 server images cannot be held out"),
    ("flare single server image", run_("defense.flare.root_size=1"), "defense.flare.root_size: 1 is out of range"),
    ("flare zero temperature", run_("defense.flare.tau=0"), "defense.flare.tau: 0.0 is out of range"),
    ("centered clip radius 0", run_("defense.centered_clip.tau=0"), "defense.centered_clip.tau: 0.0 is out of range"),
    ("centered clip no iterations", run_("defense.centered_clip.iterations=0"), "centered_clip.iterations: 0 is out"),
    ("dnc removes every client", run_("defense.name=dnc", "defense.dnc.num_malicious=2", "defense.dnc.filter_frac=2"),
     "defense.dnc.filter_frac: c = 2 removes ceil(c * f) = 4 clients for f = 2"),
    ("dnc no coordinates", run_("defense.dnc.sub_dim=0"), "defense.dnc.sub_dim: 0 is out of range"),
    ("signguard band below 1", run_("defense.signguard.upper_bound=0.5"), "defense.signguard.upper_bound: 0.5 is out"),
    ("signguard no signs", run_("defense.signguard.coordinate_fraction=0"), "signguard.coordinate_fraction: 0.0 is"),
    ("unknown defense section", run_("defense.krun.num_malicious=1"),
     "defense.krun: unknown key; did you mean 'krum'?"),
    ("unknown defense parameter", run_("defense.krum.f=1"), "defense.krum.f: unknown key"),
    ("old defense key", run_("defense.trim_beta=0.1"), "defense.trim_beta: renamed to defense.trimmed_mean.beta"),
    ("old section", run_("client.lr=0.1"), "client: renamed to training"),
    ("old malicious class key", run_("attack.client=clients.PoisonClient"),
     "attack.client: renamed to roles.malicious"),
    ("user defense missing", run_("defense.name=nowhere.MyDefense"), "defense.name: cannot import module 'nowhere'"),
    ("user defense not a defense", run_("defense.name=clients.BenignClient"),
     "defense.name: clients.BenignClient does not subclass strategies.defense.Defense"),
    ("user trigger not a trigger", run_("attack.trigger=clients.BenignClient"),
     "attack.trigger: clients.BenignClient does not subclass flip_fl.attacks.triggers.Trigger"),
    # ---- flip and labels sections
    ("one Adam beta", run_("flip_defense.betas=[0.5]"), "flip_defense.betas: [0.5] must be two numbers"),
    ("infinite hardening lr", run_("flip_defense.lr=.inf"), "flip_defense.lr: inf is not a finite number"),
    ("unknown flip schedule", run_("flip_defense.schedule=slow"),
     "flip_defense.schedule: unknown FLIP defense schedule 'slow'; choose one of fast, official"),
    ("infinite fast budget", run_("flip_defense.fast.budget=.inf"),
     "flip_defense.fast.budget: inf is not a finite number"),
    ("fast steps reversed", run_("flip_defense.fast.min_steps=50", "flip_defense.fast.max_steps=10"),
     "flip_defense.fast.min_steps: 50 exceeds flip_defense.fast.max_steps (10)"),
    ("digits split too thin", run_("data.name=digits", "federation.num_clients=3000"),
     "federation.num_clients: 1562 of 3000 clients get no data"),
    ("trajectory fraction reversed", run_("flip_labels.trajectory_fraction=[0.5, 0.2]"),
     "flip_labels.trajectory_fraction:"),
    ("zero flip budget", run_("flip_labels.budgets=[0]"), "flip_labels.budgets[0]: 0 must be at least 1"),
    ("client budget above 1", run_("flip_labels.client_budget=1.5"), "flip_labels.client_budget: 1.5 must be a count"),
    # ---- resources
    ("no CPU", run_("resources.num_cpus=0"), "resources.num_cpus: 0.0 is out of range"),
    ("more CPUs than the machine", run_("resources.num_cpus=100000"),
     "resources.num_cpus: each client asks for 100000 CPUs but this machine has"),
    ("more GPUs than the machine", run_("resources.num_gpus=1000"),
     "resources.num_gpus: each client asks for 1000 GPU(s) but this machine has"),
    ("infinite timeout", run_("resources.round_timeout=.inf"), "resources.round_timeout: inf is not a finite number"),
    ("zero memory", run_("resources.memory_gb=0"), "resources.memory_gb: 0.0 is out of range"),
    # ---- config files
    ("config missing", ["--config", "missing.yaml"], "missing.yaml: config file not found"),
    ("config is a directory", ["--config", "."], ".: not a regular file"),
    ("config is binary", ["--config", "binary.yaml"], "binary.yaml: not a text file"),
    ("config has a NUL", ["--config", "nul.yaml"], "nul.yaml: not valid YAML"),
    ("duplicate top-level key", ["--config", "dup_top.yaml"], "dup_top.yaml: not valid YAML (line 3): duplicate key"),
    ("duplicate nested key", ["--config", "dup_nested.yaml"], "dup_nested.yaml: not valid YAML (line 4): duplicate"),
    ("config is a list", ["--config", "list.yaml"], "list.yaml: the top level must be a mapping"),
    ("config is broken YAML", ["--config", "broken.yaml"], "broken.yaml: not valid YAML (line"),
    ("config alias bomb", ["--config", "bomb.yaml"], "bomb.yaml: more than 1000000 values"),
    ("config nested too deeply", ["--config", "deep.yaml"], "deep.yaml: YAML nested too deeply"),
    ("config too large", ["--config", "big.yaml"], "big.yaml: 10000103 bytes is too large for a config file"),
    # ---- flags
    ("config flag without value", ["--config"], "argument --config: expected one argument"),
    ("no config flag", [], "--config: required (or --resume RUN_DIR to continue a run)"),
    ("resume a directory without a run", ["--resume", "/nonexistent/run"],
     "--resume: /nonexistent/run holds no run (no config.yaml)"),
    ("resume with a config override", ["--resume", ".", "--set", "seed=1"],
     "--resume: continues the run with its own config.yaml; drop --set"),
    ("unknown flag", ["--config", "base.yaml", "--fast"], "unrecognized arguments: --fast"),
    ("--set without =", run_("novalue"), "--set 'novalue': expected key.path=value"),
    ("--set without a key", run_("=3"), "--set '=3': the key path is empty or malformed"),
    ("--set into a value", run_("seed.x=1"), "--set seed.x: seed is not a section"),
    ("--set with broken YAML", run_("training.lr=[1"), "--set training.lr: value '[1': not valid YAML"),
    ("--set with a duplicate key", run_("attack.trigger_args={a: 1, a: 2}"), "duplicate key 'a'"),
    ("output dir is a file", ["--config", "base.yaml", "--output-dir", "occupied.txt"],
     "--output-dir: occupied.txt is a file, not a directory"),
    ("output dir under a file", ["--config", "base.yaml", "--output-dir", "occupied.txt/run"],
     "--output-dir: occupied.txt/run cannot be created: occupied.txt is a file"),
    # ---- sweep
    ("sweep file missing", ["sweep", "--config", "nothere_sweep.yaml"], "nothere_sweep.yaml: config file not found"),
    ("sweep without grid", ["sweep", "--config", "sweep_nogrid.yaml"], "sweep_nogrid.yaml: a sweep needs a grid"),
    ("sweep unknown key", ["sweep", "--config", "sweep_unknown.yaml"], "unknown sweep key 'grids'"),
    ("sweep value not a list", ["sweep", "--config", "sweep_notlist.yaml"], "grid.defense.name: expected a non-empty"),
    ("sweep bad point", ["sweep", "--config", "sweep_badpoint.yaml"],
     "run defense.name=nope: defense.name: unknown defense 'nope'"),
    ("sweep rows not a list", ["sweep", "--config", "sweep_rows.yaml"], "rows: expected a list of key paths"),
    ("sweep base missing", ["sweep", "--config", "sweep_nobase.yaml"], "sweep_nobase.yaml: base: nothere.yaml: config"),
    ("sweep duplicate key", ["sweep", "--config", "sweep_dup.yaml"], "sweep_dup.yaml: not valid YAML (line 3): dup"),
    ("sweep zero jobs", ["sweep", "--config", "sweep_ok.yaml", "--jobs", "0"], "--jobs: 0 must be at least 1"),
    ("sweep jobs not a number", ["sweep", "--config", "sweep_ok.yaml", "--jobs", "x"], "argument --jobs: invalid int"),
    ("sweep output dir is a file", ["sweep", "--config", "sweep_ok.yaml", "--output-dir", "occupied.txt"],
     "--output-dir: occupied.txt is a file"),
    ("sweep --set bad value", ["sweep", "--config", "sweep_ok.yaml", "--set", "training.lr=.inf"],
     "training.lr: inf is not a finite number"),
    # ---- labels
    ("labels unknown stage", ["labels", "--config", "base.yaml", "--stage", "bogus"], "argument --stage: invalid"),
    ("labels user before flips", ["labels", "--config", "base.yaml", "--stage", "user", "--output-dir", "fresh"],
     "--stage user: fresh/flips/labels_150.npy is missing; run --stage flips first"),
    ("labels flips before labels", ["labels", "--config", "base.yaml", "--stage", "flips", "--output-dir", "fresh"],
     "--stage flips: fresh/labels/logits_0.pt is missing; run --stage labels first"),
    ("labels labels before experts", ["labels", "--config", "base.yaml", "--stage", "labels", "--output-dir", "fresh"],
     "--stage labels: fresh/experts/expert_0/done.json is missing; run --stage experts first"),
    ("labels bad budget", ["labels", "--config", "base.yaml", "--set", "flip_labels.budgets=[0]"],
     "flip_labels.budgets[0]"),
    ("labels config missing", ["labels", "--config", "missing.yaml"], "missing.yaml: config file not found"),
    ("labels output dir is a file", ["labels", "--config", "base.yaml", "--output-dir", "occupied.txt"],
     "--output-dir: occupied.txt is a file"),
]
# these also run as a user would, `python sim.py ...` in a subprocess
SUBPROCESS = {"config is binary", "client module raises", "initial model is a pickle", "config flag without value",
              "sweep duplicate key", "labels user before flips", "duplicate top-level key"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("catalogue")
    write_workspace(root)
    return root


@pytest.fixture(scope="module")
def background(workspace):
    """The subprocess cases, started together (two at a time) when the first one is needed."""
    pool = ThreadPoolExecutor(max_workers=2)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    def sim(argv: list[str]) -> tuple[int, str, float]:
        """(exit code, stderr, CPU seconds of the child), the child reaped with os.wait4 for its own rusage."""
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen([sys.executable, str(ROOT / "sim.py"), *argv], cwd=workspace, stdout=out,
                                    stderr=err, text=True, env=env)
            watchdog = threading.Timer(120, proc.kill)
            watchdog.start()
            _, status, usage = os.wait4(proc.pid, 0)
            watchdog.cancel()
            proc.returncode = os.waitstatus_to_exitcode(status)
            err.seek(0)
            return proc.returncode, err.read(), usage.ru_utime + usage.ru_stime

    futures: dict[str, Future] = {name: pool.submit(sim, argv) for name, argv, _ in CATALOGUE if name in SUBPROCESS}
    yield futures
    pool.shutdown()


@pytest.fixture
def tripwires(monkeypatch):
    """Reaching Ray, a sweep's runs or a label stage means a bad input was not caught: fail loudly."""
    def tripped(*args, **kwargs):
        raise AssertionError("bad input reached the runtime (Ray, a sweep run or a label stage)")

    import flip_fl.experiments.run as run_module
    import flip_fl.experiments.sweep as sweep_module

    monkeypatch.setattr(run_module, "init_ray", tripped)
    monkeypatch.setattr(sweep_module, "run_point", tripped)
    monkeypatch.setattr(cli, "run_stages", tripped)


def in_process(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse's usage errors
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err


PARAMS = [pytest.param(name, argv, expected, "in-process", id=name) for name, argv, expected in CATALOGUE] + [
    pytest.param(name, argv, expected, "subprocess", id=f"{name} (subprocess)", marks=pytest.mark.e2e)
    for name, argv, expected in CATALOGUE if name in SUBPROCESS]


@pytest.mark.parametrize("name, argv, expected, how", PARAMS)
def test_bad_input_is_exit_2_with_one_line_naming_it(name, argv, expected, how, workspace, monkeypatch, capsys,
                                                      tripwires, request):
    if how == "subprocess":
        code, err, seconds = request.getfixturevalue("background")[name].result()
    else:
        monkeypatch.chdir(workspace)
        monkeypatch.syspath_prepend(str(workspace))
        start = time.process_time()
        code, err = in_process(argv, capsys)
        seconds = time.process_time() - start
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err and "weights_only" not in err
    assert seconds < 15, f"{name} took {seconds:.1f} CPU seconds"
    assert not (workspace / "pwned.txt").exists() and not (workspace / "fresh").exists()


def test_the_catalogue_covers_every_kind_of_input():
    names = [name for name, _, _ in CATALOGUE]
    assert len(names) == len(set(names)) >= 60
    assert sum(argv[:1] == ["sweep"] for _, argv, _ in CATALOGUE) >= 10
    assert sum(argv[:1] == ["labels"] for _, argv, _ in CATALOGUE) >= 5
    sections = {s.split("=")[0].split(".")[0] for _, argv, _ in CATALOGUE for s in argv if "=" in s and "." in s}
    assert {"data", "model", "federation", "roles", "training", "server", "attack", "defense", "flip_defense",
            "flip_labels", "resources"} <= sections


@pytest.mark.parametrize("argv", [["--config", "base.yaml"], ["sweep", "--config", "sweep_ok.yaml"],
                                  ["labels", "--config", "base.yaml"]], ids=["run", "sweep", "labels"])
def test_ctrl_c_is_exit_130_with_one_line(argv, workspace, monkeypatch, capsys, tripwires):
    """Ctrl-C while the config is read (before Ray) ends every subcommand with one line, no traceback."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(workspace)
    monkeypatch.setattr(cli, "load_config", interrupted)
    monkeypatch.setattr(cli, "load_sweep", interrupted)
    code, err = in_process(argv, capsys)
    assert code == 130 and len(err.strip().splitlines()) == 1 and err.startswith("interrupted: "), err


@pytest.mark.e2e
def test_config_docs_command_prints_the_reference():
    result = subprocess.run([sys.executable, str(ROOT / "sim.py"), "config-docs"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "| `attack.target_label` |" in result.stdout


def test_an_unreachable_ray_address_exits_1_with_one_line_at_once():
    started = time.monotonic()
    argv = ["--config", "configs/quickstart.yaml", "--ray-address", "127.0.0.1:1"]
    result = subprocess.run([sys.executable, str(ROOT / "sim.py"), *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    seconds = time.monotonic() - started
    assert result.returncode == 1 and seconds < 60, (result.returncode, seconds, result.stderr)
    assert result.stderr.strip() == "error: simulation failed: cannot reach Ray at 127.0.0.1:1: Connection refused"
