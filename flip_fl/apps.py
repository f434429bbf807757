"""The Flower apps of flip-fl: what `flwr run .` starts (`[tool.flwr.app.components]` in pyproject.toml).

The same two objects run under `python sim.py` (Flower's in-process Simulation Runtime):

- `server_app`: `flip_fl.experiments.run.app`, the ServerApp around the one server loop
  (`flip_fl.federation.loop.serve`); under `flwr run` it reads the run from the run config
  (`flip_fl.experiments.run_config`) and writes everything to the run directory;
- `client_app`: `flip_fl.federation.client_app.app`, which builds the named client class on its
  partition and fits it.

Importing this module keeps a Ray cluster that `flwr run` starts on 127.0.0.1 (Flower imports the ClientApp
before it starts Ray).
"""

from flip_fl.experiments.run import app as server_app
from flip_fl.federation.client_app import app as client_app
from flip_fl.federation.runtime import local_ray_environment, quiet_environment

quiet_environment()
local_ray_environment()

__all__ = ["client_app", "server_app"]
