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
