"""Shared fixtures: the tiny model (built once per session) and a plain diffusers reference.

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
def tiny_cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("sdxl-cache"))


@pytest.fixture(scope="session")
def tiny_spec(tiny_cache_dir):
    from configs.model_spec import TinySpec

    return TinySpec(cache_dir=tiny_cache_dir, device="cpu")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_spec):
    from deployments.pipelines import load_pipeline

    return load_pipeline(tiny_spec)


@pytest.fixture(scope="session")
def tiny_dir(tiny_spec, tiny_pipe):
    from deployments.pipelines import tiny_model_dir

    return tiny_model_dir(tiny_spec)


def pytest_collection_modifyitems(config, items):
    """Run the `ray start` / `serve deploy` CLI test before the in-process cluster exists: two local
    clusters collide on fixed ports, and `ray stop` ends every Ray process on the machine."""
    items.sort(key=lambda item: 0 if item.get_closest_marker("cli") else 1)
