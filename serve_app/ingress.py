"""HTTP glue: the FastAPI routes of the ingress deployment.

Each route reads as decode (schema) → serving logic → encode. No `from __future__ import
annotations` in this module: FastAPI would then read body models as query parameters.
"""

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from ray import serve

from configs.app_args import AppArgs
from serve_app.encoding import MEDIA_TYPES, encode_image, to_base64
from serve_app.errors import error_response, exception_response, install_error_handlers
from serve_app.protocol import (
    ErrorResponse,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    Txt2ImgRequest,
)
from serve_app.serving_images import ImageServing

logger = logging.getLogger("ray.serve")

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 409, 500, 503, 504)}

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

    def __init__(self, engine: Any, args: dict[str, Any]):
        self._args = AppArgs.model_validate(args)
        self._engine = engine
        self._serving = ImageServing(engine, self._args)
        self._created = int(time.time())

    @app.post("/v1/images/generations", response_model=ImagesResponse, responses=_ERRORS)
    async def images_generations(self, body: ImageGenerationRequest) -> Any:
        """OpenAI-compatible text-to-image; images come back base64-encoded with their seeds."""
        try:
            requests = self._serving.requests_for_generations(body)
            results = await self._serving.generate(requests, user=body.user)
        except Exception as exc:
            return exception_response(exc)
        data = [
            ImageData(
                b64_json=to_base64(encode_image(result.image, body.output_format, body.output_compression)),
                seed=result.seed,
            )
            for result in results
        ]
        return ImagesResponse(
            created=int(time.time()),
            data=data,
            output_format=body.output_format,
            size=f"{requests[0].width}x{requests[0].height}",
            model=self._serving.model_id,
        )

    @app.post(
        "/v1/txt2img",
        response_class=Response,
        responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}, **_ERRORS},
    )
    async def txt2img(self, body: Txt2ImgRequest) -> Response:
        """Text-to-image answering the image bytes; the seed is in the `X-Seed` header."""
        try:
            requests = self._serving.requests_for_txt2img(body)
            (result,) = await self._serving.generate(requests)
        except Exception as exc:
            return exception_response(exc)
        return Response(
            content=encode_image(result.image, body.output_format, body.output_compression),
            media_type=MEDIA_TYPES[body.output_format],
            headers={"X-Seed": str(result.seed)},
        )

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
