"""Generation-level metrics of the Face, through `ray.serve.metrics` (exported by Ray's metrics
agent on its Prometheus endpoint, each name prefixed `ray_`; counters end in `_total`).

The ingress counts what it answers (`_AccessLog` in `http_app.py`): images by kind and outcome,
errors by status and code. The job manager counts jobs by state and the images they made. The
engine's own (rows per forward, seconds per step, queue depth, LoRA cache) are in
`deployments/replica.py`. HTTP request counts and latency by route are Ray Serve's built-ins
(`ray_serve_num_http_requests_total`, `ray_serve_http_request_latency_ms`). No torch here.
"""

from typing import Optional

from ray.serve.metrics import Counter, Gauge


class FaceMetrics:
    def __init__(self):
        self.images = Counter(
            "sdxl_images",
            description="Images asked for, by kind (txt2img, img2img, inpaint) and outcome (ok, error; jobs: their final state).",
            tag_keys=("kind", "outcome"),
        )
        self.errors = Counter(
            "sdxl_errors",
            description="Requests answered with an error envelope, by HTTP status and error code (rejections included).",
            tag_keys=("status", "code"),
        )
        self.jobs = Gauge("sdxl_jobs", description="Jobs waiting or running, by state.", tag_keys=("state",))
        self.jobs_finished = Counter(
            "sdxl_jobs_finished", description="Jobs that ended, by kind and final state.", tag_keys=("kind", "state")
        )

    def answered(self, status: int, kind: Optional[str], images: int, code: Optional[str]) -> None:
        """One HTTP answer: its images (if it made any) and its error (if it is one)."""
        if kind is not None and images:
            self.images.inc(images, tags={"kind": kind, "outcome": "ok" if status < 400 else "error"})
        if status >= 400:
            self.errors.inc(tags={"status": str(status), "code": code or "none"})

    def job_ended(self, kind: str, state: str, images: int) -> None:
        self.jobs_finished.inc(tags={"kind": kind, "state": state})
        if images:
            self.images.inc(images, tags={"kind": kind, "outcome": state})

    def jobs_now(self, queued: int, running: int) -> None:
        self.jobs.set(queued, tags={"state": "queued"})
        self.jobs.set(running, tags={"state": "running"})
