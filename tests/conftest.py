"""Shared fixtures: the shipped tiny model, loaded once per session.

Ray settings are applied before anything imports Ray: the same auth mode for this process and the
`ray`/`serve` CLIs the tests start (a stale ~/.ray/auth_token would otherwise turn token auth on),
and workers at normal priority (Ray's default nice 15 starves replicas on a loaded 2-core box).
"""

import os

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_worker_niceness"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402

from tests.app_config import app_args_for  # noqa: E402


@pytest.fixture(scope="session")
def tiny_spec():
    from configs.model_spec import TinySpec

    return TinySpec(device="cpu")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_spec):
    from deployments.pipelines import load_pipeline

    return load_pipeline(tiny_spec)


@pytest.fixture(scope="session")
def tiny_dir():
    from configs.model_spec import TINY_MODEL_DIR

    return TINY_MODEL_DIR


def pytest_collection_modifyitems(config, items):
    """Run the `ray start` / `serve deploy` CLI test before the in-process cluster exists: two local
    clusters collide on fixed ports, and `ray stop` ends every Ray process on the machine."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("cli") else 1)


@pytest.fixture(scope="session")
def local_config(tmp_path_factory):
    """The in-process app's configuration, its state in a folder of its own."""
    from configs.app_args import AppArgs

    return AppArgs.model_validate(app_args_for(tmp_path_factory.mktemp("state"))).with_state_paths()


def _on_one_torch_thread(factory):
    """`factory`, building (on its replica's engine thread) an engine whose thread runs torch's
    ops on one thread. Several in-process replicas serve from threads here beside the tests' own
    torch work, and each thread that runs parallel ops keeps an OpenMP team: more of them than
    the box's 2 cores and every small op waits for a sleeping worker (BENCHMARKS.md, "One thread
    for a replica's torch work")."""

    def build(observer):
        import torch

        torch.set_num_threads(1)
        return factory(observer)

    return build


@pytest.fixture(scope="session")
def tiny_replica(local_config):
    """The engine deployment's class around a real step engine on the tiny model, in this process
    (its loop on its own thread), as a Ray replica would run it."""
    from deployments.engine.factory import EngineFactory
    from deployments.replica import EngineReplica

    config = local_config
    model = config.model.model_dump(mode="json")
    factory = EngineFactory(
        model, config.batching.model_dump(mode="json"), loras=config.loras.model_dump(mode="json"),
        training=config.training.model_dump(mode="json"),
    )
    replica = EngineReplica(model, config.limits.model_dump(mode="json"), _on_one_torch_thread(factory))
    yield replica
    replica.close()


@pytest.fixture(scope="session")
def tiny_controlnet_replicas(local_config):
    """One in-process engine replica per ControlNet variant of the config (the tiny base plus its
    ControlNets), as the builder would deploy them: role → replica."""
    from deployments.engine.factory import EngineFactory
    from deployments.replica import EngineReplica
    from serve_app.builder import engine_roles

    config = local_config
    model = config.model.model_dump(mode="json")
    replicas = {}
    for role, deployment in engine_roles(config).items():
        if deployment.controlnets:
            factory = EngineFactory(
                model, config.batching.model_dump(mode="json"), loras=config.loras.model_dump(mode="json"),
                controlnets=deployment.controlnets,
            )
            replicas[role] = EngineReplica(model, config.limits.model_dump(mode="json"), _on_one_torch_thread(factory))
    yield replicas
    for replica in replicas.values():
        replica.close()


@pytest.fixture(scope="session")
def tiny_refiner_replica(local_config):
    """The refiner's engine replica (the tiny refiner) in this process, as the builder deploys it."""
    from deployments.engine.factory import EngineFactory
    from deployments.replica import EngineReplica
    from deployments.types import REFINER_ROLE
    from serve_app.builder import engine_roles

    config = local_config
    model = config.model.model_dump(mode="json")
    factory = EngineFactory(model, config.batching.model_dump(mode="json"), refiner=engine_roles(config)[REFINER_ROLE].refiner)
    replica = EngineReplica(model, config.limits.model_dump(mode="json"), _on_one_torch_thread(factory))
    yield replica
    replica.close()


@pytest.fixture(scope="session")
def local_server(tiny_replica, tiny_controlnet_replicas, tiny_refiner_replica, local_config):
    """The whole app without Ray: the HTTP routes over the in-process engine replica and a real
    job manager, behind Starlette's `TestClient` (a sync `httpx.Client`; the app, the job
    manager's loops and the handles' calls share its event loop)."""
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from serve_app.http_app import create_app
    from deployments.types import BASE_ROLE, REFINER_ROLE
    from serve_app.jobs.manager import JobManager
    from tests.fakes import LocalHandle, engine_registry

    config = local_config
    replicas = {BASE_ROLE: tiny_replica, **tiny_controlnet_replicas, REFINER_ROLE: tiny_refiner_replica}
    engines = engine_registry(config, replicas.__getitem__)
    manager = JobManager.__new__(JobManager)  # initialised below, on the client's event loop
    app = create_app(engines, LocalHandle(manager), config)
    with TestClient(app, base_url="http://testserver") as client:
        client.portal.call(manager.__init__, engines, config.jobs.model_dump(), config.controlnet_roles())
        yield SimpleNamespace(client=client, app=app, replica=tiny_replica, replicas=replicas, manager=manager)
        for loop in manager._loops:
            client.portal.call(loop.cancel)


@pytest.fixture(scope="module")
def http(local_server):
    """The in-process app's client (tests/integration/conftest.py's `http` is the cluster's)."""
    return local_server.client
