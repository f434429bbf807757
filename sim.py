"""flip-fl command line: run a simulation, a sweep, the FLIP label-attack pipeline, or print the config reference.

    python sim.py --config FILE [--set key.path=value ...] [--output-dir DIR] [--overwrite] [--ray-address ADDR]
                  [--quiet]
    python sim.py --resume RUN_DIR [--ray-address ADDR] [--quiet]
    python sim.py sweep --config SWEEP.yaml [--set key.path=value ...] [--output-dir DIR] [--jobs N] [--report-only]
    python sim.py labels --config FILE [--stage experts|labels|flips|user|all ...] [--set ...] [--output-dir DIR]
    python sim.py config-docs

`python sim.py --help` lists them; each command has its own `--help`. Exit codes: 0 success, 2 bad input (one
line naming the key, file or value, before Ray starts), 1 runtime failure, 130 / 143 stopped by Ctrl-C /
SIGTERM. This file wraps `flip_fl.experiments.cli` (also installed as the `flip-fl` command).
"""

from flip_fl.experiments.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
