"""In-process stand-ins for Ray handles and the engine deployment, so the HTTP app, the serving
logic and the job manager are tested without a cluster (as Ray Serve's LLM layer tests its
ingress against a mock engine).

`LocalHandle(obj)` gives any object the `DeploymentHandle` call shape: `handle.method.remote(...)`
returns an awaitable response with `cancel()`, and `handle.options(stream=True).method.remote(...)`
an async iterator with `cancel()`. `FakeEngine` has the engine deployment's public methods (a test
checks they exist on the real class) and draws a flat image whose colour is its seed.
"""

import asyncio
import contextlib
import inspect
import io
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

import httpx
import numpy as np
from PIL import Image

from configs.app_args import AppArgs
from deployments.lora_registry import describe
from deployments.training import LoraTrainingSettings, TrainingExample, TrainingProgress, TrainingResult
from deployments.types import BASE_ROLE, ControlRef, GenerationRequest, GenerationResult, Handoff, ProgressEvent
from serve_app.builder import engine_roles
from serve_app.http_app import create_app
from serve_app.jobs.manager import JobManager


class _Response:
    """Like `DeploymentResponse`: awaitable once, `cancel()` any time (a no-op when done)."""

    def __init__(self, call: Any):
        self._task = asyncio.ensure_future(call) if inspect.isawaitable(call) else None
        self._value = call

    def __await__(self):
        if self._task is None:
            async def value():
                return self._value

            return value().__await__()
        return self._task.__await__()

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


class _Stream:
    """Like a streaming `DeploymentResponseGenerator`."""

    def __init__(self, generator: Any):
        self._generator = generator

    def __aiter__(self):
        return self._generator

    def cancel(self) -> None:
        asyncio.ensure_future(self._generator.aclose())


class _Method:
    def __init__(self, function: Any, stream: bool):
        self._function, self._stream = function, stream

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        if any(isinstance(arg, _Response) for arg in args):  # Ray resolves a response passed on
            async def resolved() -> Any:
                values = [await arg if isinstance(arg, _Response) else arg for arg in args]
                result = self._function(*values, **kwargs)
                return await result if inspect.isawaitable(result) else result

            return _Response(resolved())
        result = self._function(*args, **kwargs)
        return _Stream(result) if self._stream else _Response(result)


class LocalHandle:
    def __init__(self, target: Any, stream: bool = False):
        self._target, self._stream = target, stream

    def options(self, stream: bool = False, **_: Any) -> "LocalHandle":
        return LocalHandle(self._target, stream)

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self._target, name), self._stream)


class FakeEngine:
    """The engine deployment's API with no model: a flat image per request (colour = seed % 256),
    after `delay_s`, at most `capacity` at once; `failures` are raised by the next calls."""

    def __init__(self, delay_s: float = 0.0, capacity: int = 64):
        self.delay_s = delay_s
        self.failures: list[BaseException] = []
        self.requests: list[GenerationRequest] = []
        self.trainings: list[tuple[str, LoraTrainingSettings, list[TrainingExample]]] = []
        self.discarded: list[str] = []
        self._slots = asyncio.Semaphore(capacity)

    async def generate(self, request: GenerationRequest, handoff: Optional[Handoff] = None) -> Any:
        async for event in self.generate_stream(request, handoff):
            if not isinstance(event, ProgressEvent):
                return event
        raise AssertionError("no result")

    async def generate_stream(self, request: GenerationRequest, handoff: Optional[Handoff] = None):
        """A refined request's first stage ends as a `Handoff` of flat latents (the seed's colour);
        its second stage (`handoff` given) inverts that colour, so a test sees both stages ran."""
        if handoff is not None:
            request = request.model_copy(update={"handoff": handoff})
        self.requests.append(request)
        if self.failures:
            raise self.failures.pop(0)
        arrived = time.perf_counter()
        async with self._slots:
            started = time.perf_counter()
            # A hires request's two passes run on one engine: its progress counts both.
            steps = request.progress_steps() if request.hires is not None else request.denoising_steps()
            for step in range(1, steps + 1):
                await asyncio.sleep(self.delay_s / steps)
                yield ProgressEvent(step, steps)
            colour = (request.seed or 0) % 256
            if request.refiner is not None and request.handoff is None:
                latents = np.full((4, request.height // 8, request.width // 8), colour, dtype=np.float32)
                yield Handoff(request.request_id, latents, np.zeros(8, np.uint8), steps, 1, {"queue_s": 0.0, "run_s": 0.0})
                return
            if request.handoff is not None:
                colour = 255 - int(request.handoff.latents.flat[0])
            width, height = request.output_size()
            image = np.full((height, width, 3), colour, dtype=np.uint8)
            yield GenerationResult(
                request.request_id,
                image,
                request.seed or 0,
                1,
                {"queue_s": started - arrived, "run_s": time.perf_counter() - started},
            )

    def cancel(self, request_id: str) -> bool:
        return False

    def progress(self, request_id: str) -> Optional[dict[str, int]]:
        return None

    def model_info(self) -> dict[str, Any]:
        return {"id": "sdxl-tiny", "source": "fake", "device": "cpu", "dtype": "float32"}

    async def describe_loras(self) -> list[dict[str, Any]]:
        return []

    async def control_map(self, control: ControlRef) -> np.ndarray:
        """The picture inverted (no preprocessor here; tests see the engine's answer come back)."""
        return 255 - control.image

    async def check_lora(self, path: str, name: str) -> dict[str, Any]:
        """The file's header (no model to fit it to)."""
        return {**describe(Path(path), name, builtin=False).to_json(), "fits": True}

    async def train_stream(self, job_id: str, settings: LoraTrainingSettings, examples: list[TrainingExample], owner: Optional[str] = None):
        """Progress for each step (after `delay_s` in all), then a result whose bytes name the
        job; the LoRA is not published anywhere."""
        self.trainings.append((job_id, settings, examples))
        if self.failures:
            raise self.failures.pop(0)
        for step in range(1, settings.steps + 1):
            await asyncio.sleep(self.delay_s / settings.steps)
            yield TrainingProgress(step, settings.steps, 1.0 / step, float(settings.steps - step), paused=False)
        yield TrainingResult(settings.name, job_id.encode(), settings.steps, 1.0 / settings.steps, self.delay_s, 0)

    def discard_training(self, job_id: str) -> None:
        self.discarded.append(job_id)

    def stats(self) -> dict[str, Any]:
        return {"requests": len(self.requests)}


def engine_registry(config: AppArgs, engine_for: Callable[[str], Any]) -> dict[str, LocalHandle]:
    """The `{role: handle}` registry the builder would bind for `config` (resolved), each role's
    engine made by `engine_for(role)`."""
    return {role: LocalHandle(engine_for(role)) for role in engine_roles(config)}


@contextlib.asynccontextmanager
async def local_app(
    engine: Any, state_dir: Any, roles: Optional[dict[str, Any]] = None, **args: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The ingress app in-process over `engine` (any object with the engine API) as the base,
    `roles` for other roles (a `FakeEngine` each otherwise), and a real job manager in
    `state_dir`; yields an `httpx.AsyncClient` talking ASGI to it."""
    config = AppArgs.model_validate({"state_dir": str(state_dir), **args}).with_state_paths()
    others = roles or {}
    engines = engine_registry(config, lambda role: engine if role == BASE_ROLE else others.get(role) or FakeEngine())
    manager = JobManager.__new__(JobManager)  # its constructor is async, as in a replica
    await manager.__init__(engines, config.jobs.model_dump(), config.controlnet_roles(), config.loras.routing)
    app = create_app(engines, LocalHandle(manager), config)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
            yield client
    finally:
        for loop in manager._loops:
            loop.cancel()


def post_concurrently(server: Any, path: str, bodies: list[dict]) -> list[httpx.Response]:
    """POST every body at once to the `local_server` app, on its event loop; the responses in order."""

    async def post_all() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=120) as client:
            return list(await asyncio.gather(*(client.post(path, json=body) for body in bodies)))

    return server.client.portal.call(post_all)


def decoded_rgb(content: bytes) -> np.ndarray:
    """An encoded image response's pixels, (H, W, 3) uint8."""
    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB"))


def txt2img_rgb(client: Any, body: dict[str, Any]) -> np.ndarray:
    """`POST /v1/txt2img` with `body` on a sync client, which must answer 200; the image's pixels."""
    response = client.post("/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    return decoded_rgb(response.content)


def finished_job(client: Any, job_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Poll `GET /v1/jobs/{id}` on a sync client until the job ends; its last view."""
    deadline = time.time() + timeout_s
    while (view := client.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, view
        time.sleep(0.1)
    return view
