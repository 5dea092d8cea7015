"""Replicas die; jobs and results do not. Kills Serve replica actors, so it runs last (file order)."""

import time

import httpx
import pytest
import ray

from tests.test_http_jobs import submit, wait

pytestmark = pytest.mark.integration


def _replicas(deployment: str) -> list[str]:
    return [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::sdxl#{deployment}#")
    ]


def _kill(deployment: str) -> None:
    (name,) = _replicas(deployment)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    for _ in range(200):  # wait until the controller has replaced it
        replicas = _replicas(deployment)
        if replicas and replicas != [name]:
            return
        time.sleep(0.1)
    raise AssertionError(f"{deployment} was not restarted")


def _until_ok(http, path: str, timeout_s: float = 120):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            response = http.get(path)
            if response.status_code == 200:
                return response
        except Exception:  # the proxy may refuse while the ingress restarts
            pass
        time.sleep(0.25)
    raise AssertionError(f"{path} never answered 200")


def test_results_survive_ingress_and_job_store_restarts(http):
    job = wait(http, submit(http, seed=21)["id"])
    before = http.get(f"/v1/jobs/{job['id']}/result").content
    _kill("JobManager")
    _kill("ImageIngress")
    after = _until_ok(http, f"/v1/jobs/{job['id']}/result").content
    assert after == before
    assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"


def test_killing_the_gpu_replica_mid_job_never_leaves_it_running(http):
    view = submit(http, num_inference_steps=150, width=128, height=128)
    while http.get(f"/v1/jobs/{view['id']}").json()["progress"]["percent"] == 0:
        time.sleep(0.05)
    _kill("SDXLBase")
    job = wait(http, view["id"], timeout_s=180)
    assert job["status"] in ("succeeded", "failed")
    if job["status"] == "succeeded":
        assert job["attempts"] == 2  # the first attempt died with the replica
    else:
        assert job["error"]["message"]
    assert _until_ok(http, "/healthz").json()["status"] == "ok"


def test_a_sync_request_whose_replica_dies_gets_503_with_retry_after(served, http):
    """The replica running a synchronous request is killed: the client gets a 503 it can retry
    (was: 500 `internal_error` from `ActorDiedError`)."""
    import threading

    answer = {}

    def post():
        body = {"prompt": "slow", "width": 128, "height": 128, "num_inference_steps": 150, "seed": 1}
        answer["response"] = httpx.post(f"{served.base_url}/v1/txt2img", json=body, timeout=120)

    thread = threading.Thread(target=post)
    thread.start()
    time.sleep(1.5)  # the request is on the engine (150 steps at 128² take several seconds)
    _kill("SDXLBase")
    thread.join(120)
    response = answer["response"]
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"].isdigit()
    assert response.json()["error"]["code"] == "engine_unavailable"
    assert _until_ok(http, "/healthz").json()["status"] == "ok"
