"""The flip-fl command line, installed as `flip-fl` (`python sim.py` wraps it).

Run a simulation, a sweep, the FLIP label-attack pipeline, or print the config reference:

    python sim.py --config FILE [--set key.path=value ...] [--output-dir DIR] [--overwrite] [--ray-address ADDR]
                  [--quiet]
    python sim.py --resume RUN_DIR [--ray-address ADDR] [--quiet]
    python sim.py config-docs
    python sim.py sweep --config SWEEP.yaml [--set key.path=value ...] [--output-dir DIR] [--jobs N] [--report-only]
    python sim.py labels --config FILE [--stage experts|labels|flips|user|all ...] [--set ...] [--output-dir DIR]

Exit codes: 0 success, 2 bad input (one line naming the key, file or value), 1 runtime failure, 130 / 143
stopped by SIGINT (Ctrl-C) / SIGTERM (finished rounds and a checkpoint are kept; one line says how to resume).
Bad input is found before Ray starts: the config and every file it names, the client classes, the data
partition and the output directory.
"""

from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType

from flip_fl.config import Config, ConfigError, config_reference_markdown, load_config, to_yaml
from flip_fl.config.loading import resolve_config
from flip_fl.data import load_datasets
from flip_fl.errors import one_line
from flip_fl.experiments.grid import load_sweep
from flip_fl.experiments.labels_pipeline import STAGES, check_stage_inputs, run_stages
from flip_fl.experiments.report import write_report
from flip_fl.experiments.results import default_run_dir
from flip_fl.experiments.sweep import run_sweep
from flip_fl.federation.runtime import SimulationError, quiet_environment


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see python sim.py --help)", file=sys.stderr)
        raise SystemExit(2)


class StopOnSignal:
    """While active, SIGINT and SIGTERM ask the run to stop (`event`) instead of raising wherever it is.

    The run then saves a checkpoint of its last finished round, ends its clients and Ray, and returns;
    further signals while it does so change nothing (no second, half-finished shutdown).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        self.event.set()

    @property
    def exit_code(self) -> int:
        """128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + (self.signum or signal.SIGINT)


def _parser(prog: str, description: str, *, config: str, output_dir: str,
            override: str = "override a config key; the value is parsed as YAML (repeatable)",
            config_required: bool = True) -> _Parser:
    """A subcommand parser with the options every subcommand shares: --config, --set, --output-dir."""
    parser = _Parser(prog=prog, description=description)
    parser.add_argument("--config", required=config_required, help=config)
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help=override)
    parser.add_argument("--output-dir", help=output_dir)
    return parser


def check_output_dir(path: Path, flag: str = "--output-dir") -> None:
    """The output directory must be a directory this process can write into, or one it can create.

    Checked by doing it and undoing it: the missing directories are created and a file is written into the
    directory, then both are removed again. So a read-only mount, a missing permission (also as root, whom
    permission bits do not stop) or a pseudo file system such as /proc fails here, before data or Ray, as
    one ConfigError naming the directory and the reason.
    """
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag}: {path} is a file, not a directory")
    missing = []
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        missing.append(ancestor)
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag}: {path} cannot be created: {ancestor} is a file")
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        handle, probe = tempfile.mkstemp(dir=path, prefix=".flip-fl-write-test-")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        where = f"is not writable ({reason})" if not missing else f"cannot be created in {ancestor} ({reason})"
        raise ConfigError(f"{flag}: {path} {where}") from None
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                pass


def config_file(path: str, folder: str = "") -> Path:
    """The file `--config path` means (`resolve_config`); says which one when it was found in the project's configs/."""
    found = resolve_config(path, folder)
    if found != Path(path):
        print(f"config: {found} ({path} is not in the working directory)", flush=True)
    return found


def guarded(body: Callable[[], int], interrupted: str) -> int:
    """Run a subcommand: bad input is exit 2, a failed simulation 1, Ctrl-C 130, each with one stderr line."""
    try:
        return body()
    except ConfigError as err:
        print(f"error: {one_line(err, None)}", file=sys.stderr)
        return 2
    except SimulationError as err:
        print(f"error: simulation failed: {one_line(err, None)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130


def _run_target(args: argparse.Namespace) -> tuple[Config, Path, bool]:
    """The config and output directory `sim.py` runs, and whether it resumes; ConfigError for bad input."""
    if args.resume is None:
        if args.config is None:
            raise ConfigError("--config: required (or --resume RUN_DIR to continue a run)")
        out_dir = Path(args.output_dir) if args.output_dir else default_run_dir(args.config)
        return load_config(config_file(args.config), args.set), out_dir, False
    given = [name for name, value in (("--config", args.config), ("--set", args.set), ("--output-dir", args.output_dir),
                                      ("--overwrite", args.overwrite)) if value]
    if given:
        raise ConfigError(f"--resume: continues the run with its own config.yaml; drop {', '.join(given)}")
    run_dir = Path(args.resume)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume: {run_dir} holds no run (no config.yaml)")
    return load_config(run_dir / "config.yaml", []), run_dir, True


def run_command(argv: list[str]) -> int:
    """`sim.py --config ...` / `sim.py --resume RUN_DIR`: run (or continue) one simulation."""
    parser = _parser("sim.py", "Run a flip-fl federated backdoor simulation.",
                     config="YAML config file (see docs/CONFIG.md); a bare file name not in the working directory "
                            "is looked for in the project's configs/",
                     output_dir="where results go (default runs/<config-name>-<timestamp>)", config_required=False)
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    parser.add_argument("--ray-address", help="address of an existing Ray cluster (overrides resources.ray_address)")
    parser.add_argument("--quiet", action="store_true",
                        help="plain lines (one per phase and per round) instead of the live display in a terminal")
    parser.usage = RUN_USAGE
    parser.epilog = COMMANDS_HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    args = parser.parse_args(argv)

    with StopOnSignal() as stop:

        def body() -> int:
            cfg, out_dir, resume = _run_target(args)
            check_output_dir(out_dir)
            # imported here, after quiet_environment() (flwr reads its telemetry switch on import) and after the
            # config is read (bad input fails without importing Flower)
            from flip_fl.experiments.run import RunInterrupted, run

            try:
                summary = run(cfg, out_dir, ray_address=args.ray_address or cfg.resources.ray_address,
                              quiet=args.quiet, resume=resume, overwrite=args.overwrite, stop=stop.event)
            except RunInterrupted as err:
                done = f"after round {err.server_round}" if err.server_round >= 0 else "before round 0 finished"
                print(f"interrupted {done}; resume with: python sim.py --resume {out_dir}", file=sys.stderr)
                return stop.exit_code
            final = summary["final"]
            print(f"done: {summary['rounds']} rounds in {summary['wall_seconds']:.1f}s | clean_acc "
                  f"{final['clean_acc']:.4f} | asr {final['asr']:.4f} | max asr {summary['max_asr']:.4f} | failures "
                  f"{summary['total_failures']} | results in {summary['output_dir']}")
            return 0

        return guarded(body, "metrics of the finished rounds are in the output directory")


def sweep_command(argv: list[str]) -> int:
    """`sim.py sweep ...`: run a grid of simulations and write the report."""
    parser = _parser("sim.py sweep", "Run a grid of simulations and compare them (see flip_fl/experiments/sweep.py).",
                     config="sweep YAML: base config, grid of key paths -> values",
                     output_dir="sweep directory (default runs/<sweep-name>); finished runs there are reused",
                     override="override a config key in every run (repeatable)")
    parser.add_argument("--ray-address", help="address of an existing Ray cluster for every run")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time (default 1; more finishes sooner but skews the timing columns)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rebuild results.csv/.md and plots from finished runs")
    args = parser.parse_args(argv)
    out_dir = Path(args.output_dir or f"runs/{Path(args.config).stem}")

    def body() -> int:
        sweep = load_sweep(config_file(args.config, "sweeps"), args.set)
        check_output_dir(out_dir)
        if args.report_only:
            results = write_report(sweep, out_dir)
        else:
            results = run_sweep(sweep, out_dir, args.ray_address, args.jobs, echo=lambda line: print(line, flush=True))
        bad = [r for r in results if r["status"] != "ok"]
        print(f"sweep: {len(results) - len(bad)} of {len(results)} runs finished | table {out_dir / 'results.md'} "
              f"| csv {out_dir / 'results.csv'}")
        if bad and not args.report_only:
            print(f"error: {len(bad)} runs without results (see the table and each run's log.txt)", file=sys.stderr)
            return 1
        return 0

    return guarded(body, f"finished runs are kept; rerun the same command to continue ({out_dir})")


def labels_command(argv: list[str]) -> int:
    """`sim.py labels ...`: run stages of the FLIP label-attack pipeline."""
    parser = _parser("sim.py labels", "FLIP label-only attack pipeline (see flip_fl/experiments/labels_pipeline.py).",
                     config="YAML config (data, model, attack trigger/target, flip_labels.*)",
                     output_dir="pipeline directory (default runs/<config-name>); reused across stages")
    parser.add_argument("--stage", action="append", choices=["experts", "labels", "flips", "user", "all"],
                        help="stage(s) to run (repeatable; default all); finished outputs are reused")
    args = parser.parse_args(argv)
    stages = list(STAGES) if not args.stage or "all" in args.stage else args.stage
    out_dir = Path(args.output_dir or f"runs/{Path(args.config).stem}")

    def body() -> int:
        cfg = load_config(config_file(args.config), args.set)
        check_output_dir(out_dir)
        check_stage_inputs(cfg, out_dir, stages)
        train, test = load_datasets(cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
        timings = run_stages(cfg, train, test, out_dir, stages, log=lambda line: print(line, flush=True))
        print(f"labels: stages {', '.join(timings)} done | results in {out_dir}")
        return 0

    return guarded(body, f"finished stage outputs are kept in {out_dir}")


def config_docs_command(argv: list[str]) -> int:
    """`sim.py config-docs`: print the configuration reference (docs/CONFIG.md) as markdown."""
    parser = _Parser(prog="sim.py config-docs", description=COMMANDS["config-docs"][1] + ".")
    parser.parse_args(argv)
    sys.stdout.write(config_reference_markdown())
    return 0


def unknown_command(word: str) -> int:
    """`sim.py sweeep`: one line naming the nearest subcommand (or how to give a config file); exit code 2."""
    if word.endswith((".yaml", ".yml")) or Path(word).is_file():
        hint = f"to run a config file give it with --config: python sim.py --config {word}"
    else:
        near = difflib.get_close_matches(word, list(COMMANDS), n=1, cutoff=0.6)
        hint = (f"did you mean {near[0]!r}?" if near
                else f"the commands are {', '.join(COMMANDS)}; a run needs --config FILE")
    print(f"error: unknown command {word!r}; {hint} (see python sim.py --help)", file=sys.stderr)
    return 2


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "sweep": (sweep_command, "run a grid of simulations (a sweep file) into results.csv, a markdown table and plots"),
    "labels": (labels_command, "the FLIP label-only attack pipeline: experts, labels, flips, user models"),
    "config-docs": (config_docs_command, "print the configuration reference: every key, type, default, meaning"),
}
"""The subcommands: name -> (function, one-line description for --help)."""

RUN_USAGE = """python sim.py --config FILE [--set KEY.PATH=VALUE ...] [--output-dir DIR] [--overwrite]
                     [--ray-address ADDR] [--quiet]
       python sim.py --resume RUN_DIR [--ray-address ADDR] [--quiet]
       python sim.py {sweep,labels,config-docs} ...   (each has its own --help)"""
COMMANDS_HELP = "commands (python sim.py COMMAND --help for each):\n" + "\n".join(
    f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()) + """

exit codes: 0 success; 2 bad input (one line naming the key, file or value, before Ray starts);
1 runtime failure; 130 / 143 stopped by Ctrl-C / SIGTERM (resume with --resume RUN_DIR)"""


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if os.getcwd() not in sys.path and "" not in sys.path:  # client classes are importable from the working directory
        sys.path.append(os.getcwd())
    quiet_environment()  # before anything imports flwr (it reads its telemetry switch on import)
    if argv[:1] and argv[0] in COMMANDS:
        return COMMANDS[argv[0]][0](argv[1:])
    if argv[:1] and not argv[0].startswith("-"):
        return unknown_command(argv[0])
    return run_command(argv)


if __name__ == "__main__":
    raise SystemExit(main())
