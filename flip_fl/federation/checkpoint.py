"""Checkpoints: everything a run needs to continue after a round, in one file replaced atomically.

A `RunState` is where a run stands at the end of a round: the global model, the strategy's own state
(e.g. FoolsGold's client histories), every partition's `ClientState` (FLIP trigger caches and whatever a
client class keeps) and the process's random generators. `save_checkpoint` writes it to
`RUN_DIR/checkpoint.pt` by writing a temporary file and renaming it over the old one, so a crash at any
moment leaves the previous round's checkpoint or the new one, never half of one.

The file is a `torch.save` of plain containers, numbers and tensors (arrays are stored as dtype, shape and
their raw bytes, so every numpy dtype comes back bit for bit) and loads with `torch.load(..., weights_only=True)`.
`read_torch_file` is that load for every file a run reads (checkpoints, `server.initial_model`): whatever a
damaged or foreign file makes torch raise becomes one `UnreadableFile` with a short reason.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flip_fl.errors import one_line
from flip_fl.federation.protocol import ClientState

FORMAT = 1
FILENAME = "checkpoint.pt"


class UnreadableFile(ValueError):
    """A file `torch.load(weights_only=True)` cannot read (nothing from it was run).

    `refused`: the tensors-only unpickler stopped at something it does not allow (Python objects, or
    garbage that looks like a pickle). `damaged`: the file is a PyTorch (zip) file that cannot be read to
    the end, e.g. truncated. Otherwise it is not a PyTorch file at all.
    """

    def __init__(self, reason: str, refused: bool = False, damaged: bool = False) -> None:
        super().__init__(reason)
        self.reason, self.refused, self.damaged = reason, refused, damaged


def short_reason(err: BaseException, limit: int = 90) -> str:
    """The gist of what torch.load raised, on one line of at most `limit` characters.

    torch's weights-only refusal is a paragraph of advice around one useful sentence (after
    "WeightsUnpickler error:"); other errors keep their first sentence.
    """
    text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    pickled = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if pickled:
        return one_line(f"{type(err).__name__}: it holds a pickled {pickled.group(1)}", limit)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = " ".join(text.split())
    first = re.split(r"(?<=[a-z0-9)])\.\s", text, maxsplit=1)[0] if text else ""
    detail = first.rstrip(".") or "no further detail"
    return one_line(f"{type(err).__name__}: {detail}", limit)


def read_torch_file(path: Path) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, quietly; any failure is an UnreadableFile.

    Tensors-only loading never runs code from the file; a damaged or foreign file makes torch raise
    almost anything (UnpicklingError, RuntimeError, IndexError, KeyError, UnicodeDecodeError, EOFError,
    ...) and warn about unknown pickle protocols: all of it becomes one short reason.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises whatever its readers raise on a foreign file
        with open(path, "rb") as fh:
            zipped = fh.read(4) == b"PK\x03\x04"  # torch.save's container, so a damaged (e.g. truncated) PyTorch file
        # the weights-only unpickler stopped: at a Python object, or at garbage outside torch's container
        refused = isinstance(err, pickle.UnpicklingError) and ("Unsupported global" in str(err) or not zipped)
        raise UnreadableFile(short_reason(err), refused=refused, damaged=zipped and not refused) from None


def capture_rng() -> dict[str, Any]:
    """The state of Python's, numpy's and torch's global random generators."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, encode_array(np.asarray(keys)), pos, has_gauss, cached),
            "torch": torch.get_rng_state()}


def restore_rng(rng: dict[str, Any]) -> None:
    """Set the global random generators to a `capture_rng` state."""
    random.setstate(rng["python"])
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, decode_array(keys), pos, has_gauss, cached))
    torch.set_rng_state(rng["torch"])


@dataclass
class RunState:
    """Where a run stands at the end of round `server_round` (0: the initial model was evaluated)."""

    server_round: int
    global_state: dict[str, np.ndarray]
    strategy: dict[str, np.ndarray]
    clients: dict[int, ClientState]
    rng: dict[str, Any] = field(default_factory=capture_rng)


def encode_array(array: np.ndarray) -> dict[str, Any]:
    """An array as dtype, shape and its raw bytes in a uint8 tensor (exact for every fixed-size dtype)."""
    array = np.asarray(array, order="C")  # (np.ascontiguousarray would make a 0-d array 1-d)
    raw = torch.from_numpy(np.frombuffer(array.tobytes(), dtype=np.uint8).copy())
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": raw}


def decode_array(item: dict[str, Any]) -> np.ndarray:
    """Inverse of `encode_array` (a writable copy)."""
    return np.frombuffer(item["data"].numpy().tobytes(), dtype=np.dtype(item["dtype"])).reshape(item["shape"]).copy()


def _encode_arrays(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {k: encode_array(np.asarray(v)) for k, v in arrays.items()}


def _decode_arrays(items: dict[str, Any]) -> dict[str, np.ndarray]:
    return {k: decode_array(v) for k, v in items.items()}


def save_checkpoint(run_dir: Path, state: RunState, config_yaml: str) -> Path:
    """Write `run_dir/checkpoint.pt` atomically (temporary file, fsync, rename); returns its path."""
    path = run_dir / FILENAME
    payload = {
        "format": FORMAT, "round": state.server_round, "config": config_yaml,
        "global": _encode_arrays(state.global_state), "strategy": _encode_arrays(state.strategy),
        "clients": {pid: {"arrays": _encode_arrays(c.arrays), "values": dict(c.values)}
                    for pid, c in sorted(state.clients.items())},
        "rng": state.rng,
    }
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(run_dir: Path) -> tuple[RunState, str] | None:
    """The checkpoint in `run_dir` and the config it was written under (None when there is none).

    Raises ValueError, with a one-line message naming the file and a short reason, when the file is not a
    complete checkpoint of this format (damaged, truncated, foreign, or holding Python objects).
    """
    path = run_dir / FILENAME
    if not path.is_file():
        return None
    try:
        payload = read_torch_file(path)
    except UnreadableFile as err:
        what = "damaged or truncated" if err.damaged else "not written by flip-fl"
        raise ValueError(f"{path}: not a readable checkpoint ({what}: {err.reason})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a flip-fl checkpoint of format {FORMAT}")
    try:
        state = _run_state(payload)
        _check_rng(state.rng)
        return state, _text(payload["config"])
    except Exception as err:  # a damaged payload fails anywhere in decoding: say which part, never a traceback
        raise ValueError(f"{path}: damaged flip-fl checkpoint ({short_reason(err, 80)})") from None


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"config is a {type(value).__name__}, not text")
    return value


def _run_state(payload: dict[str, Any]) -> RunState:
    """The RunState of a checkpoint payload (KeyError, TypeError, ValueError, ... when it is damaged)."""
    clients = {int(pid): ClientState(arrays=_decode_arrays(c["arrays"]), values=dict(c["values"]))
               for pid, c in payload["clients"].items()}
    server_round = payload["round"]
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
        raise ValueError(f"round {server_round!r} is not a round number")
    return RunState(server_round=server_round, global_state=_decode_arrays(payload["global"]),
                    strategy=_decode_arrays(payload["strategy"]), clients=clients, rng=payload["rng"])


def _check_rng(rng: Any) -> None:
    """Restore the saved generator states once (then put the current ones back): a damaged one raises here."""
    current = capture_rng()
    try:
        restore_rng(rng)
    finally:
        restore_rng(current)
