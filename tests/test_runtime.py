"""Ray hygiene without starting Ray: local-only switch, the connect probe, the per-node resource check."""

from __future__ import annotations

import os
import time

import pytest

from flip_fl.config import ConfigError, ResourcesConfig
from flip_fl.federation.runtime import (
    LOCAL_ONLY_ENV,
    SimulationError,
    check_node_resources,
    check_reachable,
    local_ray_environment,
)


def test_an_unreachable_address_fails_at_once_and_other_forms_are_left_to_ray():
    started = time.monotonic()
    with pytest.raises(SimulationError, match="cannot reach Ray at 127.0.0.1:1: Connection refused"):
        check_reachable("127.0.0.1:1", timeout=5)
    assert time.monotonic() - started < 5
    check_reachable("auto", timeout=5)
    check_reachable("ray://example.invalid:10001", timeout=5)


def test_a_client_must_fit_on_one_node_not_on_the_cluster_total(monkeypatch):
    import ray

    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 2.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    check_node_resources(ResourcesConfig(num_cpus=2.0))
    with pytest.raises(ConfigError, match=r"resources.num_cpus: each client asks for 3 CPU\(s\) but the largest Ray "
                                          r"node has 2"):
        check_node_resources(ResourcesConfig(num_cpus=3.0))  # 4 CPUs in all, but no node has 3
    with pytest.raises(ConfigError, match="resources.num_gpus: each client asks for 1 GPU"):
        check_node_resources(ResourcesConfig(num_gpus=1.0))  # the dead node's GPUs do not count


def test_the_local_only_switch_is_set_before_ray_starts(monkeypatch):
    monkeypatch.delenv(LOCAL_ONLY_ENV, raising=False)
    local_ray_environment()
    assert os.environ[LOCAL_ONLY_ENV] == "0"
