"""LoRA-aware routing: with two engine replicas, requests for one LoRA set go to the replica that
loaded it (Ray Serve model multiplexing keyed by the set), so the other never loads it."""

import time

import httpx
import pytest

from tests.app_config import app_args_for

pytestmark = pytest.mark.integration

SET = [{"name": "pastel", "weight": 0.5}]


@pytest.fixture(scope="module")
def two_replicas(served, tmp_path_factory):
    """A second app beside the session's: two engine replicas (no CPUs reserved: the session's
    app holds the cluster's two)."""
    from ray import serve

    from serve_app.builder import build_app

    args = app_args_for(tmp_path_factory.mktemp("routing-state"))
    args["engine"] = {"num_replicas": 2, "num_cpus": 0}
    args["ingress"] = {**args["ingress"], "num_cpus": 0}
    args["jobs"] = {**args["jobs"], "num_cpus": 0}
    args["controlnets"] = {}  # no ControlNet deployment: not what this app tests
    args["refiner"] = False  # no refiner deployment: not what this app tests
    serve.run(build_app(args), name="lora-routing", route_prefix="/routing")
    yield serve.get_deployment_handle("SDXLBase", app_name="lora-routing")
    serve.delete("lora-routing", _blocking=False)  # its replicas drain while the next tests run


def _stats_by_replica(handle) -> dict:
    """Each replica's stats: asked until both have answered (the router picks one per call)."""
    seen = {}
    for _ in range(100):
        stats = handle.stats.remote().result()
        seen[stats["replica"]] = stats
        if len(seen) == 2:
            return seen
    raise AssertionError(f"only replicas {list(seen)} answered")


def test_repeated_requests_for_a_lora_set_land_on_the_replica_that_loaded_it(served, two_replicas):
    body = {"prompt": "a red circle", "size": "64x64", "num_inference_steps": 2, "loras": SET, "seed": 1}
    with httpx.Client(base_url=f"{served.base_url}/routing", timeout=120) as http:
        assert http.post("/v1/images/generations", json=body).status_code == 200
        time.sleep(3)  # the replica's record of the set reaches the routers
        for seed in range(8):
            assert http.post("/v1/images/generations", json={**body, "seed": seed}).status_code == 200
    stats = _stats_by_replica(two_replicas)
    holders = [s["loras"] for s in stats.values() if {"pastel": 0.5} in s["loras"]["resident_sets"]]
    others = [s["loras"] for s in stats.values() if {"pastel": 0.5} not in s["loras"]["resident_sets"]]
    assert len(holders) == 1 and len(others) == 1, stats
    assert holders[0]["loads"] == 1 and holders[0]["hits"] == 8
    assert others[0]["loads"] == 0 and others[0]["hits"] == 0
