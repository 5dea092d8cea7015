"""The engine replica's health check (Ray replaces a replica whose check fails), in process."""

import time

import pytest

from configs.app_args import LimitsConfig
from configs.model_spec import TinySpec
from deployments.replica import EngineReplica


class _Engine:
    """The engine API the replica's constructor and health check use; `run` returns at once
    (a crashed loop) unless `alive`."""

    adapters = None
    background = None
    startup: dict = {}

    def __init__(self, alive: bool):
        self.alive = alive

    def run(self, stop) -> None:
        while self.alive and not stop.is_set():
            stop.wait(0.05)

    def stats(self) -> dict:
        gc = {"collections": 4, "full_collections": 1, "seconds": 0.02, "full_seconds": 0.01}
        return {"waiting": 1, "active": 2, "completed": 3, "failed": 0, "cancelled": 0, "expired": 0, "gc": gc}


def _replica(alive: bool) -> EngineReplica:
    return EngineReplica(TinySpec(device="cpu").model_dump(mode="json"), LimitsConfig().model_dump(), lambda observer: _Engine(alive))


def test_a_replica_whose_engine_loop_died_fails_its_health_check():
    replica = _replica(alive=False)
    deadline = time.time() + 5
    with pytest.raises(RuntimeError, match="engine loop thread stopped"):
        while time.time() < deadline:
            replica.check_health()
            time.sleep(0.01)
    replica.close()



def test_a_live_replica_passes_its_health_check():
    replica = _replica(alive=True)
    try:
        for _ in range(3):
            assert replica.check_health() is None
    finally:
        replica.close()
