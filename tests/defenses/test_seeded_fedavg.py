"""`strategies/seeded_fedavg.py`: what the server does with the replies before any defense sees them -- rounds
with too few valid replies fail, a client that never answers is a counted failure, duplicates are ignored.
(Screening under every defense: test_every_defense.py; what makes a reply malformed: tests/test_protocol.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from strategies import RoundFailedError
from strategies.seeded_fedavg import required_replies
from tests.defenses.rounds import (
    BAD,
    EXAMPLES,
    NODE,
    N,
    make_global,
    make_updates,
    reply,
    start_round,
    strategy,
    trained,
)


@pytest.mark.parametrize("min_clients, failing, fails", [
    (0.5, 3, False), (0.5, 4, True), (7, 1, True), (1, 6, False), (1.0, 1, True),
])
def test_min_clients_fails_a_round_instead_of_aggregating_what_is_left(min_clients, failing, fails):
    strat = strategy("fedavg", f"server.min_clients={min_clients}")
    broken_ids = [i for i in range(N) if i != BAD][:failing]

    def run_round():
        start_round(strat, make_global())
        states = [trained(make_global(), u) for u in make_updates()]
        for i in broken_ids:
            states[i]["fc.bias"][0] = np.nan
        return strat.aggregate_train(1, [reply(NODE + i, states[i], EXAMPLES[i]) for i in range(N)])

    if fails:
        with pytest.raises(RoundFailedError, match=r"round 1: (only \d+ of 7 sampled clients sent a valid reply|all 7)"
                                                   r".*client \d: model entry 'fc.bias'") as info:
            run_round()
        assert "\n" not in str(info.value)
    else:
        assert run_round()[0] is not None and strat.rounds[1].failures == failing


def test_required_replies():
    assert [required_replies(0.5, n) for n in (1, 2, 7, 10)] == [1, 1, 4, 5]
    assert required_replies(1.0, 7) == 7 and required_replies(3, 7) == 3 and required_replies(9, 7) == 7


def test_missing_and_duplicate_replies():
    """A sampled client that never answers fails with the timeout reason; a second reply from a node is ignored."""
    strat = strategy("fedavg")
    g = make_global()
    start_round(strat, g, attacking=(), malicious=())
    states = [trained(g, u) for u in make_updates()]
    replies = [reply(NODE + i, states[i], 10) for i in range(N - 1)] + [reply(NODE, states[0], 10)]
    strat.aggregate_train(1, replies)
    record = strat.rounds[1]
    assert record.failed == [N - 1] and "no reply within resources.round_timeout" in record.errors[0]
    assert sorted(record.client_metrics) == list(range(N - 1))
