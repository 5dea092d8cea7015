"""Replicas die; jobs and results do not. Kills Serve replica actors, so it runs last (file order)."""

import io
import threading
import time
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import ray
from PIL import Image

from tests.test_http_jobs import submit, wait

pytestmark = pytest.mark.integration


def _replicas(deployment: str) -> list[str]:
    return [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::sdxl#{deployment}#")
    ]


def _kill(*deployments: str) -> None:
    """Kill each deployment's one replica, all at once, then wait until the controller has replaced
    every one (it notices a dead replica at its next health check, up to 10 s later: killed
    together, those waits overlap)."""
    names = {}
    for deployment in deployments:
        (names[deployment],) = _replicas(deployment)
    for name in names.values():
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)

    def replaced(deployment: str) -> bool:
        replicas = _replicas(deployment)
        return bool(replicas) and replicas != [names[deployment]]

    waiting = set(deployments)
    for _ in range(200):  # wait until the controller has replaced them
        waiting = {deployment for deployment in waiting if not replaced(deployment)}
        if not waiting:
            return
        time.sleep(0.1)
    raise AssertionError(f"{sorted(waiting)} not restarted")


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
    _kill("JobManager", "ImageIngress")
    after = _until_ok(http, f"/v1/jobs/{job['id']}/result").content
    assert after == before
    assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"


@pytest.fixture(scope="module")
def base_killed_mid_work(served, http, engine) -> SimpleNamespace:
    """The base engine's replica killed once while it denoises both a synchronous request and a
    job: the restart is what costs, so the two tests below (one for each) share it."""
    answer = {}

    def post():
        body = {"prompt": "slow", "width": 128, "height": 128, "num_inference_steps": 150, "seed": 1}
        answer["response"] = httpx.post(f"{served.base_url}/v1/txt2img", json=body, timeout=120)

    thread = threading.Thread(target=post)
    thread.start()
    # Seconds of denoising at 128², so the kill lands mid-job; the retry on the restarted replica
    # runs every step again.
    view = submit(http, num_inference_steps=100, width=128, height=128)
    deadline = time.time() + 60
    while engine.stats.remote().result()["active"] < 2:  # both rows are denoising on the replica
        assert time.time() < deadline, "the request and the job never ran together"
        time.sleep(0.05)
    _kill("SDXLBase")
    thread.join(120)
    return SimpleNamespace(job=wait(http, view["id"], timeout_s=180), response=answer["response"])


def test_killing_the_gpu_replica_mid_job_never_leaves_it_running(http, base_killed_mid_work):
    job = base_killed_mid_work.job
    assert job["status"] in ("succeeded", "failed")
    if job["status"] == "succeeded":
        assert job["attempts"] == 2  # the first attempt died with the replica
    else:
        assert job["error"]["message"]
    assert _until_ok(http, "/healthz").json()["status"] == "ok"


def test_a_sync_request_whose_replica_dies_gets_503_with_retry_after(http, base_killed_mid_work):
    """The replica running a synchronous request is killed: the client gets a 503 it can retry
    (was: 500 `internal_error` from `ActorDiedError`)."""
    response = base_killed_mid_work.response
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"].isdigit()
    assert response.json()["error"]["code"] == "engine_unavailable"
    assert _until_ok(http, "/healthz").json()["status"] == "ok"


def _training_form(count: int = 4) -> list:
    files = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(np.full((128, 128, 3), 40 * i, dtype=np.uint8)).save(buffer, format="PNG")
        files += [("images", (f"{i}.png", buffer.getvalue(), "image/png")), ("captions", (None, f"a grey square {i}"))]
    return files


def test_a_training_job_whose_replica_dies_resumes_from_its_checkpoint(http):
    """The base replica killed mid-training (checkpoints every 10 steps, tests/app_config.py): the
    job's second attempt, on the new replica, resumes from the last checkpoint, and its LoRA is
    listed when it ends."""
    data = {"name": "survivor", "rank": "4", "steps": "80", "learning_rate": "1e-3", "seed": "0"}
    response = http.post("/v1/loras/train", data=data, files=_training_form())
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    deadline = time.time() + 120
    while http.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] < 25:
        assert time.time() < deadline, "training never reached step 25"
        time.sleep(0.1)
    _kill("SDXLBase")
    job = wait(http, job_id, timeout_s=240)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 2 and job["training"]["resumed_from"] >= 20, job
    assert "survivor" in {item["name"] for item in http.get("/v1/loras").json()["data"]}
