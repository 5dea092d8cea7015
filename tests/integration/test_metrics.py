"""The documented metrics, scraped from Ray's Prometheus endpoint on the cluster: each moves when
the service does what it counts (README, "Metrics")."""

import re
import time

import httpx
import pytest

from tests.test_http_jobs import submit, wait

pytestmark = pytest.mark.integration

#: (metric, labels it must carry): each must grow while this test runs.
MOVES = [
    ("ray_sdxl_images_total", {"kind": "txt2img", "outcome": "ok"}),
    ("ray_sdxl_images_total", {"kind": "txt2img", "outcome": "succeeded"}),
    ("ray_sdxl_errors_total", {"status": "400"}),
    ("ray_sdxl_errors_total", {"status": "404", "code": "lora_not_found"}),
    ("ray_sdxl_jobs_finished_total", {"kind": "txt2img", "state": "succeeded"}),
    ("ray_sdxl_rows_per_forward_count", {}),
    ("ray_sdxl_row_steps_total", {}),
    ("ray_sdxl_step_s_count", {}),
    ("ray_sdxl_queue_wait_s_count", {}),
    ("ray_sdxl_engine_requests_total", {"outcome": "completed"}),
    ("ray_sdxl_lora_hits_total", {}),
    ("ray_sdxl_gc_pause_s_total", {"generation": "young"}),
]
#: Gauges: present (their value is the moment's).
PRESENT = [("ray_sdxl_jobs", {"state": "queued"}), ("ray_sdxl_engine_queue", {"state": "waiting"}), ("ray_sdxl_lora_resident", {})]

_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(\{(?P<labels>.*)\})? (?P<value>\S+)$")


def _scrape(url: str) -> dict[str, list[tuple[dict, float]]]:
    found: dict[str, list[tuple[dict, float]]] = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        match = _LINE.match(line)
        if match is None or line.startswith("#"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        found.setdefault(match["name"], []).append((labels, float(match["value"])))
    return found


def _value(scraped: dict, name: str, labels: dict) -> float:
    return sum(value for found, value in scraped.get(name, []) if labels.items() <= found.items())


def test_each_documented_metric_moves(served, http):
    before = _scrape(served.metrics_url)
    body = {"prompt": "a red circle", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 1}
    for loras in ([], [{"name": "pastel"}], [{"name": "pastel"}]):  # a LoRA load, then a hit
        assert http.post("/v1/txt2img", json={**body, "loras": loras}).status_code == 200
    assert http.post("/v1/txt2img", json={**body, "width": 63}).status_code == 400
    assert http.post("/v1/txt2img", json={**body, "loras": [{"name": "nowhere"}]}).status_code == 404
    assert wait(http, submit(http, seed=5)["id"])["status"] == "succeeded"
    deadline = time.time() + 60  # the agent exports every ~10 s; engine outcomes at health checks
    while True:
        after = _scrape(served.metrics_url)
        still = [(name, labels) for name, labels in MOVES if _value(after, name, labels) <= _value(before, name, labels)]
        still += [(name, labels) for name, labels in PRESENT if not any(labels.items() <= found.items() for found, _ in after.get(name, []))]
        if not still or time.time() > deadline:
            break
        time.sleep(2)
    assert not still, still
