"""`flwr run`'s run config as a run: required workdir, paths resolved against it, resume, bad keys."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from flip_fl.config import ConfigError
from flip_fl.experiments.run_config import app_run

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_config_names_the_config_overrides_and_output_dir():
    run = app_run({"config": "configs/quickstart.yaml", "workdir": str(ROOT), "output-dir": "runs/x",
                   "overrides": "federation.num_rounds=2; data.root=mydata"})
    assert run.out_dir == ROOT / "runs/x" and not run.resume and not run.overwrite
    assert run.cfg.federation.num_rounds == 2 and run.cfg.data.root == str(ROOT / "mydata")
    stamped = app_run({"config": "configs/quickstart.yaml", "workdir": str(ROOT)}, now=dt.datetime(2026, 1, 2, 3, 4, 5))
    assert stamped.out_dir == ROOT / "runs/quickstart-20260102-030405"


@pytest.mark.parametrize("run_config, message", [
    ({"config": "configs/quickstart.yaml"}, "run config workdir: '' is not an absolute directory; add --run-config"),
    ({"config": "configs/quickstart.yaml", "workdir": "relative"}, "is not an absolute directory"),
    ({"config": "configs/quickstart.yaml", "workdir": "/nonexistent/dir"}, "is not a directory"),
    ({"config": "configs/quickstart.yaml", "workdir": str(ROOT), "rounds": 3}, "unknown key(s) rounds"),
    ({"config": "configs/quickstart.yaml", "workdir": str(ROOT), "resume": "yes"}, "resume: expected a bool"),
    ({"workdir": str(ROOT), "resume": True}, "run config resume: needs output-dir"),
    ({"workdir": str(ROOT), "resume": True, "output-dir": "runs/x", "overrides": "seed=1"}, "drop overrides"),
    ({"config": "", "workdir": str(ROOT)}, "run config config: empty"),
    ({"config": "configs/quickstart.yaml", "workdir": str(ROOT), "overrides": "seed=x"}, "seed"),
])
def test_bad_run_configs_name_the_key(run_config, message):
    with pytest.raises(ConfigError) as err:
        app_run(run_config)
    assert message in str(err.value)


def test_resume_continues_with_the_runs_own_config(tmp_path):
    first = app_run({"config": "configs/quickstart.yaml", "workdir": str(ROOT), "overrides": "seed=7"})
    (tmp_path / "run").mkdir()
    from flip_fl.config import to_yaml

    (tmp_path / "run" / "config.yaml").write_text(to_yaml(first.cfg))
    again = app_run({"workdir": str(tmp_path), "output-dir": "run", "resume": True})
    assert again.resume and again.out_dir == tmp_path / "run" and again.cfg == first.cfg
