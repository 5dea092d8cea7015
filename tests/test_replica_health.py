"""The engine replica's health check (Ray replaces a replica whose check fails) and the thread its
engine is built and run on, in process."""

import threading
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
        self.built_on = threading.current_thread()
        self.ran_on = None

    def run(self, stop) -> None:
        self.ran_on = threading.current_thread()
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


def test_the_engine_is_built_and_run_on_one_thread_of_its_own():
    """All of a replica's torch work on one thread: torch's OpenMP keeps a worker team per thread
    that ran parallel ops, and two of them on two cores slowed a tiny replica's steps 1.8x."""
    replica = _replica(alive=True)
    try:
        engine = replica._engine
        assert engine.built_on is replica._thread and engine.built_on is not threading.current_thread()
        deadline = time.time() + 5
        while engine.ran_on is None and time.time() < deadline:
            time.sleep(0.01)
        assert engine.ran_on is replica._thread
    finally:
        replica.close()


def test_a_build_that_fails_fails_the_replicas_start():
    def failing(observer):
        raise RuntimeError("warm-up failed running 2 image(s) of 64x64")

    with pytest.raises(RuntimeError, match="warm-up failed"):
        EngineReplica(TinySpec(device="cpu").model_dump(mode="json"), LimitsConfig().model_dump(), failing)


def test_model_info_says_when_the_constructor_began_and_how_long_it_took():
    """Benchmarks split a replica's time to ready by these: before its constructor, in it, after."""
    from deployments.engine.factory import EngineFactory

    model = TinySpec(device="cpu").model_dump(mode="json")
    before = time.time()
    replica = EngineReplica(model, LimitsConfig().model_dump(), EngineFactory(model, {"max_batch_size": 2}))
    try:
        info = replica.model_info()
        assert before - 0.001 <= info["started_at"] <= before + 1  # rounded to the millisecond
        assert info["start_s"] >= info["load_s"] > 0  # the constructor's time includes the load
    finally:
        replica.close()
