"""What `flwr run .` asks for: Flower's run config (`[tool.flwr.app.config]` in pyproject.toml) as a run.

Flower passes scalars only, and the ServerApp runs in another process, from a copy of the app installed
under FLWR_HOME, so it cannot know the directory `flwr run` was started in: `workdir` names it, and every
relative path (the YAML config, the output directory, `data.root`, `server.initial_model`,
`flip_labels.label_file`) resolves against it, as `sim.py` resolves them against its working directory.

    config     = "configs/quickstart.yaml"   the YAML config
    overrides  = ""                          "key.path=value; key.path=value" (as sim.py --set, ';'-separated)
    output-dir = ""                          the run directory ("": runs/<config-name>-<timestamp>)
    workdir    = ""                          absolute directory relative paths resolve against (required)
    resume     = false                       continue the run in output-dir from its checkpoint
    overwrite  = false                       replace a run already in output-dir
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flip_fl.config import Config, ConfigError, load_config
from flip_fl.experiments.results import default_run_dir

KEYS = {"config": str, "overrides": str, "output-dir": str, "workdir": str, "resume": bool, "overwrite": bool}
WORKDIR_FIX = "add --run-config \"workdir='$PWD'\" to the flwr run command"


@dataclass
class AppRun:
    """A run as the ServerApp gets it from `flwr run`: the config (paths made absolute) and where it goes."""

    cfg: Config
    out_dir: Path
    resume: bool = False
    overwrite: bool = False


def _absolute(path: str | None, base: Path) -> str | None:
    return None if path is None else str(base / Path(path).expanduser())


def with_absolute_paths(cfg: Config, base: Path) -> Config:
    """The config with its file and directory paths resolved against `base`."""
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, root=str(base / Path(cfg.data.root).expanduser())),
        server=dataclasses.replace(cfg.server, initial_model=_absolute(cfg.server.initial_model, base)),
        flip_labels=dataclasses.replace(cfg.flip_labels, label_file=_absolute(cfg.flip_labels.label_file, base)),
    )


def _checked(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config's values by key, with types checked (defaults for the keys it leaves out)."""
    unknown = sorted(set(run_config) - set(KEYS))
    if unknown:
        raise ConfigError(f"run config: unknown key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    values: dict[str, Any] = {"config": "", "overrides": "", "output-dir": "", "workdir": "", "resume": False,
                              "overwrite": False}
    for name, value in run_config.items():
        if not isinstance(value, KEYS[name]):
            raise ConfigError(f"run config {name}: expected a {KEYS[name].__name__}, got {value!r}")
        values[name] = value
    return values


def app_run(run_config: Mapping[str, Any], now: dt.datetime | None = None) -> AppRun:
    """The run that `flwr run`'s run config describes; ConfigError names the key and the fix."""
    values = _checked(run_config)
    workdir = Path(values["workdir"]).expanduser()
    if not values["workdir"] or not workdir.is_absolute():
        raise ConfigError(f"run config workdir: {values['workdir']!r} is not an absolute directory; {WORKDIR_FIX}")
    if not workdir.is_dir():
        raise ConfigError(f"run config workdir: {workdir} is not a directory")
    output = values["output-dir"]
    if values["resume"]:
        if not output:
            raise ConfigError("run config resume: needs output-dir, the run directory to continue")
        if values["overrides"] or values["overwrite"]:
            raise ConfigError("run config resume: continues the run with its own config.yaml; "
                              "drop overrides and overwrite")
        out_dir = workdir / output
        return AppRun(load_config(out_dir / "config.yaml", []), out_dir, resume=True)
    if not values["config"]:
        raise ConfigError("run config config: empty; name the YAML config, e.g. configs/quickstart.yaml")
    config_path = workdir / values["config"]
    overrides = [item.strip() for item in values["overrides"].split(";") if item.strip()]
    cfg = with_absolute_paths(load_config(config_path, overrides), workdir)
    out_dir = workdir / (output or default_run_dir(config_path, now))
    return AppRun(cfg, out_dir, overwrite=values["overwrite"])
