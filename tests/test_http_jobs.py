"""Async jobs over HTTP, in-process over the real engine on the tiny model and a real job manager
(no Ray): submit, poll, progress, events, cancel, webhooks, batches, stored files."""

import base64
import io
import json
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from tests.fakes import post_concurrently
from tests.app_config import free_port


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _picture(seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _mask() -> Image.Image:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return Image.fromarray(mask)


def submit(http, kind="txt2img", n=1, **params) -> dict:
    body = {"kind": kind, "n": n, "params": {"prompt": "a red circle", "width": 64, "height": 64, "num_inference_steps": 3, **params}}
    response = http.post("/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    return response.json()


def wait(http, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {job}")


@pytest.mark.parametrize(
    "kind, params",
    [
        ("txt2img", {}),
        ("img2img", {"image": _png(_picture()), "strength": 0.5, "width": None, "height": None}),
        ("inpaint", {"image": _png(_picture()), "mask": _png(_mask()), "width": None, "height": None}),
    ],
)
def test_submit_poll_result_for_each_kind(http, kind, params):
    view = submit(http, kind, seed=5, **{k: v for k, v in params.items() if v is not None})
    assert view["status"] == "queued" and view["links"]["result"] == f"/v1/jobs/{view['id']}/result"
    job = wait(http, view["id"])
    assert job["status"] == "succeeded", job
    assert job["seeds"] == [5] and job["progress"]["percent"] == 100.0 and job["kind"] == kind
    result = http.get(view["links"]["result"])
    assert result.status_code == 200 and result.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(result.content)).size == (64, 64)


def test_job_image_equals_the_synchronous_image(http):
    job = wait(http, submit(http, seed=77)["id"])
    sync = http.post("/v1/txt2img", json={"prompt": "a red circle", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 77})
    stored = http.get(f"/v1/jobs/{job['id']}/result")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(stored.content))), np.asarray(Image.open(io.BytesIO(sync.content))))


def test_progress_rises_monotonically_to_100(http):
    view = submit(http, num_inference_steps=30, width=128, height=128)  # about a second: polled many times
    seen = []
    while True:
        job = http.get(f"/v1/jobs/{view['id']}").json()
        seen.append(job["progress"]["percent"])
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.05)
    assert job["status"] == "succeeded"
    assert seen == sorted(seen) and seen[-1] == 100.0
    assert any(0 < p < 100 for p in seen)  # it was seen mid-way, not only at the ends


def test_events_stream_progress_then_done(http):
    view = submit(http, num_inference_steps=30, width=128, height=128)
    events = []
    with http.stream("GET", f"/v1/jobs/{view['id']}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    assert events[-1][0] == "done" and events[-1][1]["status"] == "succeeded"
    percents = [data["progress"]["percent"] for _, data in events]
    assert percents == sorted(percents) and all(name == "progress" for name, _ in events[:-1])


def test_n_images_give_a_zip_with_manifest(http):
    job = wait(http, submit(http, n=3, seed=40, output_format="jpeg")["id"])
    result = http.get(f"/v1/jobs/{job['id']}/result")
    assert result.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(result.content))
    assert sorted(archive.namelist()) == ["0000.jpg", "0001.jpg", "0002.jpg", "manifest.json"]
    manifest = json.loads(archive.read("manifest.json"))
    assert [image["seed"] for image in manifest["images"]] == [40, 41, 42]
    assert all(Image.open(io.BytesIO(archive.read(name))).format == "JPEG" for name in archive.namelist()[:3])


def test_cancel_running_job_leaves_its_batch_neighbour_unchanged(local_server, http):
    params = {"num_inference_steps": 40, "width": 128, "height": 128}  # seconds: the cancel lands mid-run
    bodies = [{"kind": "txt2img", "params": {"prompt": p, "seed": s, **params}} for p, s in (("keep", 1), ("drop", 2))]
    before = local_server.replica.stats()
    keep, drop = (response.json() for response in post_concurrently(local_server, "/v1/jobs", bodies))
    while http.get(f"/v1/jobs/{drop['id']}").json()["progress"]["percent"] == 0:
        time.sleep(0.05)
    cancelled = http.delete(f"/v1/jobs/{drop['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert http.delete(f"/v1/jobs/{drop['id']}").status_code == 409
    kept = wait(http, keep["id"])
    assert kept["status"] == "succeeded"
    after = local_server.replica.stats()
    assert 2 in after["rows_per_forward"][len(before["rows_per_forward"]) :]  # they really shared forwards
    assert after["cancelled"] - before["cancelled"] == 1  # the engine dropped the cancelled row
    assert http.get(f"/v1/jobs/{drop['id']}/result").status_code == 409
    alone = http.post("/v1/txt2img", json={"prompt": "keep", "seed": 1, **params})
    stored = http.get(f"/v1/jobs/{keep['id']}/result")
    diff = np.abs(np.asarray(Image.open(io.BytesIO(stored.content))).astype(int) - np.asarray(Image.open(io.BytesIO(alone.content))).astype(int))
    assert diff.max() <= 1


class _Receiver(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["content-length"]))
        type(self).received.append(json.loads(body))
        self.send_response(500 if len(type(self).received) == 1 else 204)  # the first try fails
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_gets_the_final_state_after_a_retry(http):
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        body = {"kind": "txt2img", "params": {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 2},
                "webhook_url": f"http://127.0.0.1:{port}/hook"}
        view = http.post("/v1/jobs", json=body).json()
        wait(http, view["id"])
        deadline = time.time() + 30
        while len(_Receiver.received) < 2 and time.time() < deadline:
            time.sleep(0.1)
    finally:
        server.shutdown()
    assert [hook["id"] for hook in _Receiver.received] == [view["id"], view["id"]]
    assert _Receiver.received[-1]["status"] == "succeeded" and _Receiver.received[-1]["result"]["media_type"] == "image/png"


def test_list_jobs_newest_first(http):
    first, second = submit(http), submit(http)
    listed = http.get("/v1/jobs", params={"limit": 5}).json()
    ids = [job["id"] for job in listed["data"]]
    assert listed["object"] == "list" and ids.index(second["id"]) < ids.index(first["id"])


def test_url_response_format_downloads(http):
    response = http.post(
        "/v1/images/generations",
        json={"prompt": "x", "size": "64x64", "num_inference_steps": 2, "n": 2, "response_format": "url", "seed": 3},
    )
    assert response.status_code == 200, response.text
    items = response.json()["data"]
    assert all(item["b64_json"] is None for item in items)
    for item in items:
        image = http.get(item["url"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(image.content)).size == (64, 64)
    assert http.get("/v1/files/file-unknown").status_code == 404


def test_openai_client_url_format(http):
    import openai

    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=http)
    result = client.images.generate(prompt="x", size="64x64", response_format="url", extra_body={"num_inference_steps": 2})
    assert http.get(result.data[0].url).status_code == 200


def test_batch_of_prompts_answers_a_zip(http):
    response = http.post(
        "/v1/images/batch",
        json={"prompts": ["a", "b", "c"], "params": {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 9}},
    )
    assert response.status_code == 200, response.text
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    manifest = json.loads(archive.read("manifest.json"))
    assert [entry["prompt"] for entry in manifest["images"]] == ["a", "b", "c"]
    assert [entry["file"] for entry in manifest["images"]] == ["0000.png", "0001.png", "0002.png"]
    assert all(entry["seed"] == 9 and entry["timings"]["run_s"] > 0 for entry in manifest["images"])


def test_batch_of_mixed_requests_async(http):
    body = {
        "async": True,
        "output_format": "webp",
        "requests": [
            {"kind": "txt2img", "params": {"prompt": "t", "width": 64, "height": 64, "num_inference_steps": 2}},
            {"kind": "img2img", "params": {"prompt": "i", "image": _png(_picture()), "num_inference_steps": 2}},
        ],
    }
    response = http.post("/v1/images/batch", json=body)
    assert response.status_code == 202, response.text
    job = wait(http, response.json()["id"])
    archive = zipfile.ZipFile(io.BytesIO(http.get(f"/v1/jobs/{job['id']}/result").content))
    manifest = json.loads(archive.read("manifest.json"))
    assert [entry["kind"] for entry in manifest["images"]] == ["txt2img", "img2img"]
    assert sorted(archive.namelist()) == ["0000.webp", "0001.webp", "manifest.json"]


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/jobs", {"kind": "txt2img", "params": {}}, 400, "params.prompt"),
        ("/v1/jobs", {"kind": "txt2img", "params": {"prompt": "x", "width": 65}}, 400, "params.width"),
        ("/v1/jobs", {"kind": "txt2img", "params": {"prompt": "x", "response_format": "image"}}, 400, "params.response_format"),
        ("/v1/jobs", {"kind": "img2img", "params": {"prompt": "x"}}, 400, "params.image"),
        ("/v1/jobs", {"kind": "magic", "params": {"prompt": "x"}}, 400, "kind"),
        ("/v1/jobs", {"kind": "txt2img", "params": {"prompt": "x"}, "webhook_url": "ftp://x/y"}, 400, "webhook_url"),
        ("/v1/jobs", {"kind": "txt2img", "params": {"prompt": "x"}, "n": 11}, 400, "n"),
        ("/v1/images/batch", {"prompts": ["a"], "requests": [{"params": {"prompt": "b"}}]}, 400, "prompts"),
        ("/v1/images/batch", {"prompts": ["a"] * 65}, 400, "prompts"),
        ("/v1/images/batch", {"prompts": ["a"], "params": {"output_format": "jpeg"}}, 400, "params.output_format"),
        ("/v1/images/batch", {"requests": [{"params": {"prompt": "a", "steps": 3}}]}, 400, "requests.0.params.steps"),
        ("/v1/images/batch", {"prompts": ["a"], "webhook_url": "http://127.0.0.1:1/x"}, 400, "webhook_url"),
    ],
)
def test_bad_job_and_batch_requests(http, path, body, status, param):
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("method, path", [("GET", "/v1/jobs/job-nope"), ("GET", "/v1/jobs/job-nope/result"), ("DELETE", "/v1/jobs/job-nope")])
def test_unknown_job_is_404(http, method, path):
    response = http.request(method, path)
    assert response.status_code == 404 and response.json()["error"]["code"] == "job_not_found"
