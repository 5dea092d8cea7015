"""The real Ray Serve app, started once on a local 2-CPU cluster for the integration tests and
shut down after the last of them (package scope: they run first, and the unit tests after them
then have both cores to themselves instead of sharing them with an idle cluster)."""

from types import SimpleNamespace

import httpx
import pytest

from tests.app_config import app_args_for, free_port


@pytest.fixture(scope="package")
def app_args(tmp_path_factory) -> dict:
    return app_args_for(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="package")
def served(app_args):
    import ray
    from ray import serve

    from serve_app.builder import build_app

    # Logical CPUs (the machine has two cores): the default graph reserves 5 — ingress 0.5, job
    # manager 0.5, the base engine 1, the canny and silhouette ControlNet variants and the refiner 1 each.
    # Ray's metrics agent serves every replica's metrics in Prometheus format on this port.
    metrics_port = free_port()
    ray.init(address="local", num_cpus=5, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_args), name="sdxl", route_prefix="/")
    yield SimpleNamespace(base_url=f"http://127.0.0.1:{port}", app_name="sdxl", metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")
    # No `serve.shutdown()` first: its graceful drain of every replica costs seconds, and the
    # cluster this process started ends with all its processes (controller and replicas too).
    ray.shutdown()


@pytest.fixture(scope="package")
def http(served):
    with httpx.Client(base_url=served.base_url, timeout=120) as client:
        yield client


@pytest.fixture(scope="package")
def engine(served):
    from ray import serve

    return serve.get_deployment_handle("SDXLBase", app_name=served.app_name)
