"""The HTTP app: `create_app(engines, jobs, args)` builds the FastAPI routes over injected handles.

The Ray ingress deployment (`serve_app/ingress.py`) serves what this returns; tests build the same
app in-process over fake or local handles and call it through `httpx.ASGITransport`, with no
cluster. Each route reads as decode (schema) → serving logic → encode; image decoding and encoding
run in worker threads, off the event loop that all of the replica's requests share. No `from
__future__ import annotations` in this module: FastAPI would then read body models as query
parameters.
"""

import asyncio
import json
import logging
import time
import uuid
from typing import Annotated, Any, Mapping, Optional, Union

from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi import Path as FastAPIPath
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi_offline import FastAPIOffline

from configs.app_args import AppArgs, Scope
from deployments.types import BASE_ROLE, LORA_NAME_PATTERN, ForbiddenError, InvalidRequestError, UnsupportedMediaTypeError
from serve_app.auth import ApiKeys, Principal
from serve_app.encoding import MEDIA_TYPES, encode_image, to_base64
from serve_app.errors import engine_call_error, error_response, install_error_handlers
from serve_app.job_events import job_event_stream
from serve_app.metrics import FaceMetrics
from serve_app.openapi import TRAINING_PATH, body_schema, install_openapi, training_body
from serve_app.playground_routes import install_playground
from serve_app.protocol import (
    BatchRequest,
    ControlNetList,
    ErrorResponse,
    ImageData,
    ImageEditRequest,
    ImageGenerationRequest,
    ImagesResponse,
    Img2ImgJob,
    Img2ImgRequest,
    InpaintJob,
    InpaintRequest,
    JobView,
    LoraInfo,
    LoraList,
    ModelCard,
    ModelList,
    PreprocessRequest,
    Txt2ImgJob,
    Txt2ImgRequest,
)
from serve_app.request_body import BodyLimit, body_limit, parse_body
from serve_app.quotas import QuotaExceededError
from serve_app.serving_controlnets import ControlNetServing
from serve_app.serving_images import Generated, ImageServing
from serve_app.serving_jobs import JobServing, links
from serve_app.serving_loras import LoraServing
from serve_app.serving_training import TrainingServing

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 403, 404, 409, 410, 413, 415, 429, 500, 503, 504)}
#: One JSON line per answered request (`_AccessLog`), under Ray Serve's logger so it lands in the
#: replica's log with the others.
access_log = logging.getLogger("ray.serve.access")
_IMAGES_JSON = {"schema": {"$ref": "#/components/schemas/ImagesResponse"}}
_NATIVE_RESPONSES = {
    200: {"content": {**{t: {} for t in MEDIA_TYPES.values()}, "application/json": _IMAGES_JSON}},
    **_ERRORS,
}
_FILE_RESPONSES = {200: {"content": {**{t: {} for t in MEDIA_TYPES.values()}, "application/zip": {}}}, **_ERRORS}
_LORA_UPLOAD = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "A LoRA in .safetensors."},
                        "name": {"type": "string", "description": "Its name (default: the file's name)."},
                    },
                }
            }
        },
    }
}


def _encode_all(results: list, output_format: str, quality: Optional[int]) -> list[bytes]:
    # Runs in a worker thread: encoding a 1024² PNG takes ~0.1 s, which would otherwise stall
    # every other request on this replica's event loop.
    return [encode_image(result.image, output_format, quality) for result in results]


def server_timing(arrived: float, generated: Generated, encode_s: float) -> str:
    """A W3C `Server-Timing` value (ms) whose parts add up to the time the request spent in the
    ingress (`total`): `decode` (body and images, until the engine calls went out), `queue`
    (waiting to run: the handle's queue, the engine replica's, admission, transfers), `run` (the
    engine running the slowest image) and `encode`. A client's latency beyond `total` is the
    proxy and the network."""
    decode_s = generated.sent_at - arrived
    total_s = time.perf_counter() - arrived
    parts = {
        "decode": decode_s,
        "queue": generated.queue_s,
        "run": generated.run_s,
        "encode": encode_s,
        "total": total_s,
    }
    return ", ".join(f"{name};dur={seconds * 1e3:.1f}" for name, seconds in parts.items())


class _AccessLog:
    """ASGI middleware: stamps the time a request reached this replica (before its body is read)
    and an id (`X-Request-Id` on the answer), and logs one JSON line when it is answered: id,
    API key name, method, path, status, milliseconds, plus what the route added to
    `request.state.log` (kind, images, size, steps; the prompt only with `ingress.log_prompts`)
    and an error's code; and counts the answer (`FaceMetrics.answered`). Never the key itself,
    nor a query string (webhook URLs and tokens live there)."""

    def __init__(self, app: Any, metrics: FaceMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = "req-" + uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state.update(arrived=time.perf_counter(), log={})
        status, error = [500], bytearray()

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            elif status[0] >= 400 and len(error) < _ERROR_BYTES:  # the envelope: small, one chunk
                error.extend(message.get("body", b"")[:_ERROR_BYTES])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            log = state["log"]
            if status[0] >= 400:
                log["error"] = _error_code(bytes(error))
            line = {
                "event": "request", "id": request_id, "method": scope["method"], "path": scope["path"], "status": status[0],
                "ms": round((time.perf_counter() - state["arrived"]) * 1e3, 1), **log,
            }
            access_log.info(json.dumps(line, ensure_ascii=False))
            self.metrics.answered(status[0], log.get("kind"), log.get("images", 0), log.get("error"))


#: Bytes of an error answer read for its code (the envelope is well under this).
_ERROR_BYTES = 4096


def _error_code(body: bytes) -> Optional[str]:
    """The `error.code` of an envelope (its `type` when it has no code); None for another body."""
    try:
        error = json.loads(body)["error"]
        return error.get("code") or error.get("type")
    except (ValueError, KeyError, TypeError):
        return None


async def _form(request: Request, **limits: int) -> FormData:
    """The body as a form: multipart (or, with no file to carry, URL-encoded); 415 for another
    content type. The parser's own refusals (too many parts, a text part over 1 MiB, a broken
    body) are the envelope's 400s."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise UnsupportedMediaTypeError(
            f"content type {content_type or 'none'!r} is not supported; send multipart/form-data",
            code="unsupported_content_type",
        )
    try:
        return await request.form(**limits)
    except StarletteHTTPException as exc:
        if exc.status_code != 400:  # e.g. the body limit's 413
            raise
        raise InvalidRequestError(f"the form cannot be read: {exc.detail}", code="invalid_form") from None


#: A client's own deadline for a synchronous image request, in seconds (at most
#: `ingress.engine_timeout_s`): past it the answer is 504 and the engine drops the rows at its next step.
TIMEOUT_HEADER = "X-Request-Timeout"


def _request_timeout(value: Optional[str], most: float) -> Optional[float]:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= most:  # NaN fails the comparison too
        raise InvalidRequestError(
            f"{TIMEOUT_HEADER} {value!r} must be seconds in (0, {most:g}] (ingress.engine_timeout_s)",
            param=TIMEOUT_HEADER,
            code="invalid_timeout",
        )
    return seconds


async def _call(method: Any, *args: Any) -> Any:
    """`await method.remote(*args)` on a handle; Ray's own failures (also a refusal at `.remote()`)
    become the envelope's 503s (see `engine_call_error`)."""
    try:
        return await method.remote(*args)
    except Exception as exc:  # noqa: BLE001 - mapped, then raised for the app's handlers
        raise engine_call_error(exc) from None


def create_app(engines: Mapping[str, Any], jobs: Any, args: AppArgs) -> FastAPI:
    """The FastAPI app of the ingress over a registry of engine handles (`{"base": handle}`) and
    the job manager's handle. Handles are Ray `DeploymentHandle`s in a deployment, or anything
    with the same `.method.remote(...)` shape in tests."""
    loras = LoraServing(args.loras, engines[BASE_ROLE], _call)
    images = ImageServing(engines, args, loras)
    controlnets = ControlNetServing(args, engines[BASE_ROLE], _call)
    job_serving = JobServing(images, jobs, args)
    training = TrainingServing(args, loras.registry, jobs, _call)
    keys = ApiKeys(args.auth)
    created = int(time.time())
    # Swagger UI and ReDoc from files shipped in the `fastapi-offline` wheel: GPU hosts are often
    # offline, and the stock pages load from a CDN.
    app = FastAPIOffline(
        title="sdxl-serve",
        summary="SDXL image generation on Ray Serve, with an OpenAI-compatible images API.",
        version="0.1.0",
    )
    # LoRA uploads are files of up to `loras.max_upload_bytes`, training sets bodies of up to
    # `training.max_upload_bytes`; every other body holds images.
    lora_body = args.loras.max_upload_bytes + 1024 * 1024
    overrides = {("POST", "/v1/loras"): lora_body, ("POST", TRAINING_PATH): args.training.max_upload_bytes}
    app.add_middleware(BodyLimit, limit=body_limit(args.limits), overrides=overrides)
    if args.ingress.cors_origins:  # off unless configured: no cross-origin reads by default
        app.add_middleware(
            CORSMiddleware,
            allow_origins=args.ingress.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", TIMEOUT_HEADER],
            expose_headers=["X-Seed", "X-Batch-Size", "X-Request-Id", "Server-Timing", "Retry-After"],
            max_age=600,
        )
    app.add_middleware(_AccessLog, metrics=FaceMetrics())
    install_error_handlers(app)
    install_openapi(app, args)
    install_playground(app, args)  # static pages, open, not in the schema

    async def charge(principal: Principal, **amounts: int) -> None:
        """Take `amounts` (`requests`, `images`) from the key's per-minute quotas, kept by the job
        manager for every ingress replica; 429 with `Retry-After` when they are spent."""
        key = principal.key
        limits = {} if key is None else {"requests": key.requests_per_minute, "images": key.images_per_minute}
        if not any(limit is not None and amounts.get(what) for what, limit in limits.items()):
            return
        wait = await _call(jobs.admit, key.name, limits, amounts)
        if wait:
            spent = " and ".join(what for what, limit in limits.items() if limit is not None and amounts.get(what))
            raise QuotaExceededError(f"the API key {key.name!r} has spent its {spent} per minute; retry in {wait:.0f} s", wait)

    async def admitted(request: Request, principal: Principal, requests: list, user: Optional[str] = None) -> list:
        """Images about to be made: charged to the key's image quota, described in the access log,
        their deadline brought forward when the client asks (`X-Request-Timeout`)."""
        await charge(principal, images=len(requests))
        first = requests[0]
        request.state.log.update(
            kind=first.kind, images=len(requests), size="{}x{}".format(*first.output_size()), steps=first.num_inference_steps,
            **({"user": user} if user else {}), **({"prompt": first.prompt} if args.ingress.log_prompts else {}),
        )
        timeout_s = _request_timeout(request.headers.get(TIMEOUT_HEADER), args.ingress.engine_timeout_s)
        if timeout_s is None:
            return requests
        deadline = time.time() + timeout_s
        return [r.model_copy(update={"deadline": min(deadline, r.deadline or deadline)}) for r in requests]

    def authorized(scope: Optional[Scope] = None) -> Any:
        """The route dependency: the request's principal (401 without a known key, 403 without
        `scope`), one request charged to its quota."""

        async def dependency(request: Request) -> Principal:
            principal = keys.check(request.headers.get("authorization"), scope)
            request.state.log["key"] = principal.name
            await charge(principal, requests=1)
            return principal

        return Depends(dependency)

    async def images_response(body: Any, requests: list, results: list, request: Request) -> ImagesResponse:
        encoded = await asyncio.to_thread(_encode_all, results, body.output_format, body.output_compression)
        if getattr(body, "response_format", None) == "url":
            media_type = MEDIA_TYPES[body.output_format]
            file_ids = await _call(jobs.put_files, [(data, media_type) for data in encoded])
            base = args.ingress.public_base_url or str(request.base_url).rstrip("/")
            data = [ImageData(url=f"{base}/v1/files/{fid}", seed=r.seed) for fid, r in zip(file_ids, results)]
        else:
            data = [ImageData(b64_json=to_base64(image), seed=r.seed) for image, r in zip(encoded, results)]
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=body.output_format,
            size="{}x{}".format(*requests[0].output_size()),
            model=images.model_id,
        )

    async def native_response(body: Any, requests: list, generated: Generated, request: Request) -> Response:
        started = time.perf_counter()
        arrived = request.state.arrived
        if body.response_format == "b64_json":
            response = await images_response(body, requests, generated.results, request)
            timing = server_timing(arrived, generated, time.perf_counter() - started)
            return JSONResponse(response.model_dump(mode="json"), headers={"Server-Timing": timing})
        (result,) = generated.results
        (content,) = await asyncio.to_thread(_encode_all, generated.results, body.output_format, body.output_compression)
        return Response(
            content=content,
            media_type=MEDIA_TYPES[body.output_format],
            # X-Batch-Size: how many requests shared this image's forward passes (load tuning).
            headers={
                "X-Seed": str(result.seed),
                "X-Batch-Size": str(result.batch_size),
                "Server-Timing": server_timing(arrived, generated, time.perf_counter() - started),
            },
        )

    # -- images ----------------------------------------------------------------------------------

    @app.post("/v1/images/generations", response_model=ImagesResponse, responses=_ERRORS)
    async def images_generations(
        body: ImageGenerationRequest, request: Request, principal: Principal = authorized("generate")
    ) -> Any:
        """OpenAI-compatible text-to-image; images come back base64-encoded (or as stored
        `url`s) with their seeds."""
        requests = images.requests_for_generations(body, principal.owner)
        requests = await admitted(request, principal, requests, body.user)
        generated = await images.generate(requests)
        return await images_response(body, requests, generated.results, request)

    @app.post(
        "/v1/images/edits", response_model=ImagesResponse, responses=_ERRORS, openapi_extra=body_schema(ImageEditRequest)
    )
    async def images_edits(request: Request, principal: Principal = authorized("generate")) -> Any:
        """OpenAI-compatible edits (multipart): inpaint the mask's transparent area, or img2img."""
        body = await parse_body(request, ImageEditRequest, args.limits)
        requests = await asyncio.to_thread(images.requests_for_edit, body, principal.owner)
        requests = await admitted(request, principal, requests, body.user)
        generated = await images.generate(requests)
        return await images_response(body, requests, generated.results, request)

    @app.post("/v1/txt2img", response_class=Response, responses=_NATIVE_RESPONSES)
    async def txt2img(body: Txt2ImgRequest, request: Request, principal: Principal = authorized("generate")) -> Response:
        """Text-to-image answering the image bytes (seed in `X-Seed`), or JSON with `b64_json`."""
        requests = images.requests_for_txt2img(body, owner=principal.owner)
        requests = await admitted(request, principal, requests)
        return await native_response(body, requests, await images.generate(requests), request)

    @app.post(
        "/v1/img2img", response_class=Response, responses=_NATIVE_RESPONSES, openapi_extra=body_schema(Img2ImgRequest)
    )
    async def img2img(request: Request, principal: Principal = authorized("generate")) -> Response:
        """Image-to-image from JSON (base64 `image`) or multipart/form-data."""
        body = await parse_body(request, Img2ImgRequest, args.limits)
        requests = await asyncio.to_thread(images.requests_for_img2img, body, 1, principal.owner)
        requests = await admitted(request, principal, requests)
        return await native_response(body, requests, await images.generate(requests), request)

    @app.post(
        "/v1/inpaint", response_class=Response, responses=_NATIVE_RESPONSES, openapi_extra=body_schema(InpaintRequest)
    )
    async def inpaint(request: Request, principal: Principal = authorized("generate")) -> Response:
        """Inpainting (white mask = repaint) from JSON (base64 `image`/`mask`) or multipart/form-data."""
        body = await parse_body(request, InpaintRequest, args.limits)
        requests = await asyncio.to_thread(images.requests_for_inpaint, body, 1, principal.owner)
        requests = await admitted(request, principal, requests)
        return await native_response(body, requests, await images.generate(requests), request)

    # -- async jobs, batches, stored files -------------------------------------------------------

    @app.post("/v1/jobs", status_code=202, responses=_ERRORS)
    async def submit_job(
        body: Annotated[Union[Txt2ImgJob, Img2ImgJob, InpaintJob], Body(discriminator="kind")],
        principal: Principal = authorized("jobs"),
    ) -> Any:
        """Queue any native request (`kind` says which; `params` is its body, images as base64);
        answers 202 with the job and its links."""
        await charge(principal, images=body.n)
        return JSONResponse(await job_serving.submit(body, principal), status_code=202)

    @app.get("/v1/jobs", responses=_ERRORS)
    async def list_jobs(limit: int = Query(20, ge=1, le=100), principal: Principal = authorized("jobs")) -> Any:
        """Recent jobs (the API key's own), newest first."""
        found = await _call(jobs.list_jobs, limit, principal.owner)
        return {"object": "list", "data": [{**job, "links": links(job["id"])} for job in found]}

    @app.get("/v1/jobs/{job_id}", responses=_ERRORS)
    async def get_job(job_id: str, principal: Principal = authorized("jobs")) -> Any:
        """Status, per-job progress (step/total/percent), timestamps, error, seeds."""
        return {**await _call(jobs.get, job_id, principal.owner), "links": links(job_id)}

    @app.delete("/v1/jobs/{job_id}", responses=_ERRORS)
    async def cancel_job(job_id: str, principal: Principal = authorized("jobs")) -> Any:
        """Cancel: a queued job never runs; a running one stops at its next denoising step."""
        return {**await _call(jobs.cancel, job_id, principal.owner), "links": links(job_id)}

    @app.get("/v1/jobs/{job_id}/result", response_class=Response, responses=_FILE_RESPONSES)
    async def job_result(job_id: str, principal: Principal = authorized("jobs")) -> Response:
        """The image, or a ZIP (images + manifest.json) when the job made several."""
        data, media_type, name = await _call(jobs.result, job_id, principal.owner)
        return Response(data, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse, responses=_ERRORS)
    async def job_events(job_id: str, principal: Principal = authorized("jobs")) -> Any:
        """Server-sent events: `progress` while the job changes, then one `done` with the final state."""
        first = await _call(jobs.get, job_id, principal.owner)
        return StreamingResponse(job_event_stream(jobs, first), media_type="text/event-stream")

    @app.post(
        "/v1/images/batch",
        response_class=Response,
        responses={200: {"content": {"application/zip": {}}}, 202: {"description": "With `async: true`: the job."}, **_ERRORS},
    )
    async def images_batch(body: BatchRequest, principal: Principal = authorized("generate")) -> Response:
        """Many requests, one ZIP (images + manifest.json); with `async: true`, a job making it
        (the key needs the `jobs` scope too)."""
        if body.run_async and not principal.allows("jobs"):
            raise ForbiddenError(f"the API key {principal.name!r} lacks the 'jobs' scope an async batch needs", code="missing_scope")
        payload = await asyncio.to_thread(job_serving.batch_payload, body, principal.owner)
        await charge(principal, images=len(payload.requests))
        if body.run_async:
            return JSONResponse(await job_serving.submit_batch(payload, body.webhook_url, principal), status_code=202)
        data, media_type, name = await job_serving.run_batch(payload)
        return Response(data, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/v1/files/{file_id}", response_class=Response, responses=_FILE_RESPONSES)
    async def get_file(file_id: str) -> Response:
        """A stored image (OpenAI `response_format: "url"`), until it expires."""
        data, media_type = await _call(jobs.get_file, file_id)
        return Response(data, media_type=media_type)

    # -- LoRA registry --------------------------------------------------------------------------

    @app.get("/v1/loras", response_model=LoraList, responses=_ERRORS)
    async def list_loras(principal: Principal = authorized()) -> Any:
        """Registered LoRAs (the shipped examples and the API key's own): size, format, rank, the
        components they target, whether they fit the served model."""
        return await loras.list(principal.owner)

    @app.post("/v1/loras", status_code=201, response_model=LoraInfo, responses=_ERRORS, openapi_extra=_LORA_UPLOAD)
    async def upload_lora(request: Request, principal: Principal = authorized("loras")) -> Any:
        """Upload a LoRA (multipart `file`, `.safetensors` only; optional `name`): checked against
        the served model, then usable by name at once."""
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError("send the LoRA as a multipart file part named file", param="file", code="missing")
        name = form.get("name")
        described = await loras.upload(
            upload.file, upload.filename, name if isinstance(name, str) and name else None, principal.owner
        )
        return JSONResponse(described, status_code=201)

    @app.post(
        TRAINING_PATH,
        status_code=202,
        response_model=JobView,
        responses=_ERRORS,
        openapi_extra=training_body(args),
        include_in_schema=training.enabled,
    )
    async def train_lora(request: Request, principal: Principal = authorized("training")) -> Any:
        """Fine-tune a new LoRA on uploaded examples (multipart): the settings as text parts, the
        examples as repeated `images` file parts with one `captions` text part each (in order), or
        as one `dataset` ZIP of images with same-named `.txt` captions. Answers 202 with the
        training job and its links; the LoRA is usable by name once the job succeeds."""
        training.check_enabled()
        form = await _form(request, **training.form_limits())
        try:
            return JSONResponse(await training.submit(form.multi_items(), principal), status_code=202)
        finally:
            await form.close()

    @app.delete("/v1/loras/{name}", responses=_ERRORS)
    async def delete_lora(
        name: Annotated[str, FastAPIPath(pattern=LORA_NAME_PATTERN)], principal: Principal = authorized("loras")
    ) -> Any:
        """Remove an uploaded LoRA (the shipped examples stay); new requests can no longer name it."""
        return await loras.delete(name, principal.owner)

    # -- ControlNets ----------------------------------------------------------------------------

    @app.get("/v1/controlnets", response_model=ControlNetList, responses=_ERRORS)
    async def list_controlnets(principal: Principal = authorized()) -> Any:
        """Served ControlNets: the variant (deployment) hosting each, and which combine with it."""
        return controlnets.list()

    @app.post(
        "/v1/controlnets/preprocess",
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, **_ERRORS},
        openapi_extra=body_schema(PreprocessRequest),
    )
    async def preprocess_control(request: Request, principal: Principal = authorized("generate")) -> Response:
        """The control map a preprocessor makes of a picture (PNG, white edges on black), from JSON
        (base64 `image`) or multipart/form-data: what `controlnet.preprocess` will follow."""
        body = await parse_body(request, PreprocessRequest, args.limits)
        return Response(await controlnets.preprocess(body), media_type="image/png")

    @app.get("/v1/models", response_model=ModelList)
    async def models(principal: Principal = authorized()) -> ModelList:
        return ModelList(data=[ModelCard(id=images.model_id, created=created)])

    @app.get("/healthz", responses={503: {"model": ErrorResponse}})
    async def healthz() -> Any:
        """Ready when every engine answers: its model is loaded and a replica is serving."""
        infos = {}
        for role, engine in images.engines.items():
            try:
                infos[role] = await asyncio.wait_for(engine.model_info.remote(), timeout=5.0)
            except Exception:
                return error_response(503, f"the {role} engine is not ready", "overloaded_error", code="not_ready")
        return JSONResponse({"status": "ok", "model": infos[BASE_ROLE], "engines": sorted(infos)})

    return app
