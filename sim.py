"""flip-fl command line: run a simulation, or print the config reference.

    python sim.py --config FILE [--set key.path=value ...] [--output-dir DIR] [--ray-address ADDR]
    python sim.py config-docs

Exit codes: 0 success, 2 bad input (one line naming the key, file or value), 1 runtime failure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see python sim.py --help)", file=sys.stderr)
        raise SystemExit(2)


def run_command(argv: list[str]) -> int:
    parser = _Parser(prog="sim.py", description="Run a flip-fl federated backdoor simulation.")
    parser.add_argument("--config", required=True, help="YAML config file (see docs/CONFIG.md)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a config key; the value is parsed as YAML (repeatable)")
    parser.add_argument("--output-dir", help="where results go (default runs/<config-name>-<timestamp>)")
    parser.add_argument("--ray-address", help="address of an existing Ray cluster (overrides resources.ray_address)")
    args = parser.parse_args(argv)

    from flip_fl.config import load_config
    from flip_fl.schema import ConfigError

    try:
        cfg = load_config(args.config, args.set)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = Path(args.output_dir or f"runs/{Path(args.config).stem}-{stamp}")
        from flip_fl.simulation import SimulationError, run

        summary = run(cfg, out_dir, ray_address=args.ray_address or cfg.resources.ray_address)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SimulationError as err:
        print(f"error: simulation failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: metrics of the finished rounds are in the output directory", file=sys.stderr)
        return 130
    final = summary["final"]
    print(f"done: {summary['rounds']} rounds in {summary['wall_seconds']:.1f}s | clean_acc {final['clean_acc']:.4f} "
          f"| asr {final['asr']:.4f} | max asr {summary['max_asr']:.4f} | failures {summary['total_failures']} "
          f"| results in {summary['output_dir']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["config-docs"]:
        from flip_fl.config import config_reference_markdown

        sys.stdout.write(config_reference_markdown())
        return 0
    return run_command(argv)


if __name__ == "__main__":
    raise SystemExit(main())
