"""The real Ray Serve app, started once per session on a local 2-CPU cluster."""

import socket
from types import SimpleNamespace

import httpx
import pytest

#: Long enough that a burst of concurrent test requests lands in one batch window.
BATCH_WAIT_S = 0.3
MAX_BATCH = 8


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def jobs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="session")
def app_args(jobs_dir) -> dict:
    return {
        "model": {"source": "tiny", "name": "sdxl-tiny", "device": "cpu"},
        "batching": {"max_batch_size": MAX_BATCH, "batch_wait_timeout_s": BATCH_WAIT_S},
        "engine": {"num_replicas": 1, "num_cpus": 1},
        "ingress": {"num_replicas": 1, "num_cpus": 0.5, "engine_timeout_s": 120},
        "limits": {"max_n": 10},
        "jobs": {
            "db_path": str(jobs_dir / "jobs.sqlite3"),
            "results_dir": str(jobs_dir / "results"),
            "max_attempts": 2,
            "webhook_backoff_s": 0.1,
            "cleanup_interval_s": 1.0,
        },
    }


@pytest.fixture(scope="session")
def served(app_args):
    import ray
    from ray import serve

    from serve_app.builder import build_app

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="sdxl", route_prefix="/")
    yield SimpleNamespace(base_url=f"http://127.0.0.1:{port}", app_name="sdxl")
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def http(served):
    with httpx.Client(base_url=served.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def engine(served):
    from ray import serve

    return serve.get_deployment_handle("SDXLBase", app_name=served.app_name)
