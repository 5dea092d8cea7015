"""Serving logic of the image endpoints: HTTP bodies -> `GenerationRequest`s -> engine -> results.

No HTTP here (that is `ingress.py`) and no torch: this module validates against the configured
limits, draws seeds, fans `n` images out as separate requests (the engine's batcher fuses them
again), and waits for the engine within the configured timeout.
"""

import asyncio
import logging
import secrets
import time
from typing import Any, Optional

from pydantic import ValidationError

from configs.app_args import AppArgs
from deployments.types import (
    MAX_SEED,
    DeadlineExceededError,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    ModelNotFoundError,
    check_limits,
)
from serve_app.protocol import ImageGenerationRequest, SDXLControls, Txt2ImgRequest

logger = logging.getLogger("ray.serve")


class ImageServing:
    """Turns validated HTTP bodies into engine calls; one instance per ingress replica."""

    def __init__(self, engine: Any, args: AppArgs):
        self._engine = engine
        self._args = args

    @property
    def model_id(self) -> str:
        return self._args.model.name

    def requests_for_generations(self, body: ImageGenerationRequest) -> list[GenerationRequest]:
        if body.response_format == "url":
            raise InvalidRequestError(
                "response_format 'url' is not available yet (it needs stored results); use 'b64_json'",
                param="response_format",
                code="unsupported_value",
            )
        if body.n > self._args.limits.max_n:
            raise InvalidRequestError(
                f"n {body.n} is above the limit of {self._args.limits.max_n}", param="n", code="invalid_n"
            )
        width, height = body.parsed_size()
        try:
            return self._requests(body, width, height, body.n)
        except InvalidRequestError as exc:
            if exc.param in ("width", "height"):  # this endpoint's field for both is `size`
                raise InvalidRequestError(exc.message, param="size", code=exc.code) from None
            raise

    def requests_for_txt2img(self, body: Txt2ImgRequest) -> list[GenerationRequest]:
        return self._requests(body, body.width, body.height, 1)

    def _requests(
        self, body: SDXLControls, width: Optional[int], height: Optional[int], n: int
    ) -> list[GenerationRequest]:
        if body.model is not None and body.model != self.model_id:
            raise ModelNotFoundError(
                f"model {body.model!r} does not exist here; available: {self.model_id!r}",
                param="model",
                code="model_not_found",
            )
        if body.output_compression is not None and body.output_format == "png":
            raise InvalidRequestError(
                "output_compression applies to jpeg and webp only, not png",
                param="output_compression",
                code="unsupported_value",
            )
        for name, side in (("width", width), ("height", height)):
            if side is not None and side % 8:
                raise InvalidRequestError(
                    f"{name} {side} must be a multiple of 8", param=name, code="invalid_size"
                )
        first_seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
        deadline = time.time() + self._args.ingress.engine_timeout_s
        try:
            requests = [
                GenerationRequest(
                    prompt=body.prompt,
                    negative_prompt=body.negative_prompt,
                    width=width,
                    height=height,
                    num_inference_steps=body.num_inference_steps,
                    guidance_scale=body.guidance_scale,
                    scheduler=body.scheduler,
                    seed=(first_seed + i) % (MAX_SEED + 1),
                    deadline=deadline,
                ).with_defaults(self._args.model)
                for i in range(n)
            ]
        except ValidationError as exc:  # bounds the HTTP schema leaves to the contract
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            raise InvalidRequestError(f"invalid {param}: {first['msg']}", param=param) from None
        check_limits(requests[0], self._args.limits)
        return requests

    async def generate(self, requests: list[GenerationRequest], user: Optional[str] = None) -> list[GenerationResult]:
        """Run all requests concurrently on the engine; all succeed or the first error is raised."""
        logger.info(
            "generating %d image(s) %dx%d, %d steps, user=%r",
            len(requests),
            requests[0].width,
            requests[0].height,
            requests[0].num_inference_steps,
            user,
        )
        responses = [self._engine.generate.remote(request) for request in requests]
        try:
            return await asyncio.wait_for(
                asyncio.gather(*responses), timeout=self._args.ingress.engine_timeout_s
            )
        except asyncio.TimeoutError:
            raise DeadlineExceededError(
                f"the images were not ready within {self._args.ingress.engine_timeout_s}s", code="timeout"
            ) from None
        finally:
            for response in responses:  # no-op for finished ones; frees the engine for the rest
                response.cancel()
