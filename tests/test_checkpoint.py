"""Checkpoints and client state in messages: exact round trips, atomic writes.

A strategy's own state (`state_dict`) is tested with each defense: tests/defenses/test_every_defense.py and
tests/defenses/test_foolsgold.py."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from flip_fl.federation.checkpoint import FILENAME, RunState, capture_rng, load_checkpoint, restore_rng, save_checkpoint
from flip_fl.federation.protocol import ClientState, FitResult, fit_reply, read_state, take_state, write_state

ARRAYS = {
    "flag": np.asarray(True),  # 0-d, as BatchNorm counters and FLIP's warm-up flag are
    "count": np.asarray(7, dtype=np.int64),
    "half": np.linspace(-1, 1, 12, dtype=np.float16).reshape(3, 4),
    "nan": np.array([np.nan, 1.0, -np.inf]),
    "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
    "empty": np.zeros((0, 5), dtype=np.uint8),
}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x.dtype == b[k].dtype and x.shape == b[k].shape and np.array_equal(x, b[k], equal_nan=x.dtype.kind == "f")
        for k, x in a.items())


def test_a_checkpoint_gives_back_every_array_bit_for_bit(tmp_path):
    clients = {3: ClientState(arrays=dict(ARRAYS), values={"fits": 2, "name": "x", "ok": True, "lr": 0.5}),
               11: ClientState()}
    state = RunState(5, {"w": np.ones((2, 2), np.float32), "n": np.asarray(4)}, {"history/3": np.ones(3, np.float32)},
                     clients)
    save_checkpoint(tmp_path, state, "seed: 1\n")
    loaded, config = load_checkpoint(tmp_path)
    assert config == "seed: 1\n" and loaded.server_round == 5 and sorted(loaded.clients) == [3, 11]
    assert same(loaded.global_state, state.global_state) and same(loaded.strategy, state.strategy)
    assert same(loaded.clients[3].arrays, ARRAYS) and loaded.clients[3].values == clients[3].values
    assert loaded.clients[11].arrays == {} and loaded.clients[11].values == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]  # the temporary file was renamed
    torch.load(tmp_path / FILENAME, weights_only=True)  # plain containers: loads without unpickling code


def test_unreadable_or_missing_checkpoints(tmp_path):
    assert load_checkpoint(tmp_path) is None
    (tmp_path / FILENAME).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path)
    torch.save({"format": 99}, tmp_path / FILENAME)
    with pytest.raises(ValueError, match="not a flip-fl checkpoint"):
        load_checkpoint(tmp_path)


def test_random_generators_come_back_where_they_were():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    saved = capture_rng()
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


def test_client_state_goes_out_with_the_message_and_comes_back_in_the_reply():
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.ones(2))})})
    write_state(content, ClientState(arrays=dict(ARRAYS), values={"fits": 1}))
    sent = read_state(content)
    assert same(sent.arrays, ARRAYS) and sent.values == {"fits": 1}

    reply = fit_reply(FitResult({"w": torch.zeros(2)}, 5, {"loss": 0.5}), ClientState(values={"fits": 2}))
    back = take_state(reply)
    assert back is not None and back.values == {"fits": 2} and back.arrays == {}
    assert len(reply.array_records) == 1 and isinstance(reply.metric_records["weights"], MetricRecord)
    assert take_state(reply) is None  # taken out: Flower's aggregation sees exactly one ArrayRecord

