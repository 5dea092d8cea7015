"""HTTP glue: the FastAPI routes of the ingress deployment.

Each route reads as decode (schema) → serving logic → encode. Image decoding and encoding run in
worker threads, off the event loop that all of the replica's requests share. No `from __future__
import annotations` in this module: FastAPI would then read body models as query parameters.
"""

import asyncio
import time
from typing import Any, Optional

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from configs.app_args import AppArgs
from serve_app.encoding import MEDIA_TYPES, encode_image, to_base64
from serve_app.errors import error_response, install_error_handlers
from serve_app.protocol import (
    BatchRequest,
    ErrorResponse,
    ImageData,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    Img2ImgRequest,
    InpaintRequest,
    JobSubmission,
    ModelCard,
    ModelList,
    Txt2ImgRequest,
)
from serve_app.job_events import job_event_stream
from serve_app.request_body import parse_body
from serve_app.serving_jobs import JobServing, links
from serve_app.serving_images import ImageServing

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 409, 410, 413, 415, 429, 500, 503, 504)}
_IMAGES_JSON = {"schema": {"$ref": "#/components/schemas/ImagesResponse"}}
_NATIVE_RESPONSES = {
    200: {"content": {**{t: {} for t in MEDIA_TYPES.values()}, "application/json": _IMAGES_JSON}},
    **_ERRORS,
}


def _body_schema(model: type) -> dict:
    """OpenAPI for routes that read JSON or multipart themselves (FastAPI cannot declare both)."""
    schema = model.model_json_schema()
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}, "multipart/form-data": {"schema": schema}},
        }
    }


def _encode_all(results: list, output_format: str, quality: Optional[int]) -> list[bytes]:
    # Runs in a worker thread: encoding a 1024² PNG takes ~0.1 s, which would otherwise stall
    # every other request on this replica's event loop.
    return [encode_image(result.image, output_format, quality) for result in results]


def _server_timing(results: list, encode_s: float) -> str:
    """A W3C `Server-Timing` value (ms) for the slowest of the images: `queue`, its wait on the
    engine (batch window, batches ahead of it); `run`, the engine running its batch (its pipeline
    call and any other call of that batch); `encode`. A client's latency minus these is routing
    and transfer."""
    queue_s = max(result.timings["queue_s"] for result in results)
    run_s = max(result.timings["batch_s"] for result in results)
    return f"queue;dur={queue_s * 1e3:.1f}, run;dur={run_s * 1e3:.1f}, encode;dur={encode_s * 1e3:.1f}"


app = FastAPI(
    title="sdxl-serve",
    summary="SDXL image generation on Ray Serve, with an OpenAI-compatible images API.",
    version="0.1.0",
)
install_error_handlers(app)


@serve.deployment(name="ImageIngress")
@serve.ingress(app)
class ImageIngress:
    """The HTTP face: validation, routing to the engine, image encoding."""

    def __init__(self, engine: Any, jobs: Any, args: dict[str, Any]):
        self._args = AppArgs.model_validate(args)
        self._engine = engine
        self._jobs = jobs
        self._serving = ImageServing(engine, self._args)
        self._job_serving = JobServing(self._serving, jobs, self._args)
        self._created = int(time.time())

    @app.post("/v1/images/generations", response_model=ImagesResponse, responses=_ERRORS)
    async def images_generations(self, body: ImageGenerationRequest, request: Request) -> Any:
        """OpenAI-compatible text-to-image; images come back base64-encoded (or as stored
        `url`s) with their seeds."""
        requests = self._serving.requests_for_generations(body)
        results = await self._serving.generate(requests, user=body.user)
        return await self._images_response(body, requests, results, request)

    @app.post(
        "/v1/images/edits",
        response_model=ImagesResponse,
        responses=_ERRORS,
        openapi_extra=_body_schema(ImageEditRequest),
    )
    async def images_edits(self, request: Request) -> Any:
        """OpenAI-compatible edits (multipart): inpaint the mask's transparent area, or img2img."""
        body = await parse_body(request, ImageEditRequest, self._args.limits)
        requests = await asyncio.to_thread(self._serving.requests_for_edit, body)
        results = await self._serving.generate(requests, user=body.user)
        return await self._images_response(body, requests, results, request)

    @app.post("/v1/txt2img", response_class=Response, responses=_NATIVE_RESPONSES)
    async def txt2img(self, body: Txt2ImgRequest) -> Response:
        """Text-to-image answering the image bytes (seed in `X-Seed`), or JSON with `b64_json`."""
        requests = self._serving.requests_for_txt2img(body)
        results = await self._serving.generate(requests)
        return await self._native_response(body, requests, results)

    @app.post(
        "/v1/img2img", response_class=Response, responses=_NATIVE_RESPONSES, openapi_extra=_body_schema(Img2ImgRequest)
    )
    async def img2img(self, request: Request) -> Response:
        """Image-to-image from JSON (base64 `image`) or multipart/form-data."""
        body = await parse_body(request, Img2ImgRequest, self._args.limits)
        requests = await asyncio.to_thread(self._serving.requests_for_img2img, body)
        results = await self._serving.generate(requests)
        return await self._native_response(body, requests, results)

    @app.post(
        "/v1/inpaint", response_class=Response, responses=_NATIVE_RESPONSES, openapi_extra=_body_schema(InpaintRequest)
    )
    async def inpaint(self, request: Request) -> Response:
        """Inpainting (white mask = repaint) from JSON (base64 `image`/`mask`) or multipart/form-data."""
        body = await parse_body(request, InpaintRequest, self._args.limits)
        requests = await asyncio.to_thread(self._serving.requests_for_inpaint, body)
        results = await self._serving.generate(requests)
        return await self._native_response(body, requests, results)

    async def _images_response(
        self, body: Any, requests: list, results: list, request: Optional[Request] = None
    ) -> ImagesResponse:
        encoded = await asyncio.to_thread(_encode_all, results, body.output_format, body.output_compression)
        if getattr(body, "response_format", None) == "url":
            media_type = MEDIA_TYPES[body.output_format]
            file_ids = await self._jobs.put_files.remote([(data, media_type) for data in encoded])
            base = self._args.ingress.public_base_url or str(request.base_url).rstrip("/")
            data = [ImageData(url=f"{base}/v1/files/{fid}", seed=r.seed) for fid, r in zip(file_ids, results)]
        else:
            data = [ImageData(b64_json=to_base64(image), seed=r.seed) for image, r in zip(encoded, results)]
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=body.output_format,
            size=f"{requests[0].width}x{requests[0].height}",
            model=self._serving.model_id,
        )

    async def _native_response(self, body: Any, requests: list, results: list) -> Response:
        started = time.perf_counter()
        if body.response_format == "b64_json":
            response = await self._images_response(body, requests, results)
            timing = _server_timing(results, time.perf_counter() - started)
            return JSONResponse(response.model_dump(mode="json"), headers={"Server-Timing": timing})
        (result,) = results
        (content,) = await asyncio.to_thread(_encode_all, results, body.output_format, body.output_compression)
        return Response(
            content=content,
            media_type=MEDIA_TYPES[body.output_format],
            # X-Batch-Size: how many requests shared this image's forward passes (load tuning).
            headers={
                "X-Seed": str(result.seed),
                "X-Batch-Size": str(result.batch_size),
                "Server-Timing": _server_timing(results, time.perf_counter() - started),
            },
        )

    # -- async jobs, batches, stored files -------------------------------------------------------

    @app.post("/v1/jobs", status_code=202, responses=_ERRORS)
    async def submit_job(self, body: JobSubmission) -> Any:
        """Queue any generation request; answers 202 with the job and its links."""
        return JSONResponse(await self._job_serving.submit(body), status_code=202)

    @app.get("/v1/jobs", responses=_ERRORS)
    async def list_jobs(self, limit: int = Query(20, ge=1, le=100)) -> Any:
        """Recent jobs, newest first."""
        jobs = await self._jobs.list_jobs.remote(limit)
        return {"object": "list", "data": [{**job, "links": links(job["id"])} for job in jobs]}

    @app.get("/v1/jobs/{job_id}", responses=_ERRORS)
    async def get_job(self, job_id: str) -> Any:
        """Status, per-job progress (step/total/percent), timestamps, error, seeds."""
        job = await self._jobs.get.remote(job_id)
        return {**job, "links": links(job_id)}

    @app.delete("/v1/jobs/{job_id}", responses=_ERRORS)
    async def cancel_job(self, job_id: str) -> Any:
        """Cancel: a queued job never runs; a running one stops at its next denoising step."""
        job = await self._jobs.cancel.remote(job_id)
        return {**job, "links": links(job_id)}

    @app.get("/v1/jobs/{job_id}/result", response_class=Response, responses=_ERRORS)
    async def job_result(self, job_id: str) -> Response:
        """The image, or a ZIP (images + manifest.json) when the job made several."""
        data, media_type, name = await self._jobs.result.remote(job_id)
        return Response(data, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse, responses=_ERRORS)
    async def job_events(self, job_id: str) -> Any:
        """Server-sent events: `progress` while the job changes, then one `done` with the final state."""
        first = await self._jobs.get.remote(job_id)
        return StreamingResponse(job_event_stream(self._jobs, first), media_type="text/event-stream")

    @app.post("/v1/images/batch", response_class=Response, responses={200: {"content": {"application/zip": {}}}, **_ERRORS})
    async def images_batch(self, body: BatchRequest) -> Response:
        """Many requests, one ZIP (images + manifest.json); with `async: true`, a job making it."""
        payload = await asyncio.to_thread(self._job_serving.batch_payload, body)
        if body.run_async:
            return JSONResponse(await self._job_serving.submit_batch(payload, body.webhook_url), status_code=202)
        data, media_type, name = await self._job_serving.run_batch(payload)
        return Response(data, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/v1/files/{file_id}", response_class=Response, responses=_ERRORS)
    async def get_file(self, file_id: str) -> Response:
        """A stored image (OpenAI `response_format: "url"`), until it expires."""
        data, media_type = await self._jobs.get_file.remote(file_id)
        return Response(data, media_type=media_type)

    @app.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self._serving.model_id, created=self._created)])

    @app.get("/healthz", responses={503: {"model": ErrorResponse}})
    async def healthz(self) -> Any:
        """Ready when the engine answers: the model is loaded and a replica is serving."""
        try:
            info = await asyncio.wait_for(self._engine.model_info.remote(), timeout=5.0)
        except Exception:
            return error_response(503, "the model engine is not ready", "overloaded_error", code="not_ready")
        return JSONResponse({"status": "ok", "model": info})
