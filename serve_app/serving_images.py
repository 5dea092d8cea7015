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
from serve_app.errors import invalid_request_from, renamed_params
from serve_app import image_inputs
from serve_app.protocol import (
    Img2ImgRequest,
    ImageEditRequest,
    ImageGenerationRequest,
    InpaintRequest,
    SDXLControls,
    Txt2ImgRequest,
)

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
        self.check_n(body.n)
        width, height = body.parsed_size()
        with _size_is_one_field():
            return self._requests(body, "txt2img", width, height, n=body.n)

    def requests_for_txt2img(self, body: Txt2ImgRequest, n: int = 1) -> list[GenerationRequest]:
        return self._requests(body, "txt2img", body.width, body.height, n=n)

    def requests_for_img2img(self, body: Img2ImgRequest, n: int = 1) -> list[GenerationRequest]:
        image = image_inputs.open_image(body.image, "image", self._args.limits)
        width, height = self._size_for(image, (body.width, body.height), "image")
        prepared = image_inputs.prepare(image, None, (width, height))
        return self._requests(body, "img2img", None, None, n=n, image=prepared, strength=body.strength)

    def requests_for_inpaint(self, body: InpaintRequest, n: int = 1) -> list[GenerationRequest]:
        limits = self._args.limits
        image = image_inputs.open_image(body.image, "image", limits)
        mask = image_inputs.greyscale_mask(image_inputs.open_image(body.mask, "mask", limits))
        width, height = self._size_for(image, (body.width, body.height), "image")
        prepared = image_inputs.prepare(image, mask, (width, height))
        return self._requests(body, "inpaint", None, None, n=n, image=prepared, **_inpaint_options(body))

    def requests_for_edit(self, body: ImageEditRequest) -> list[GenerationRequest]:
        """OpenAI edits: inpaint where the mask (or, without one, the image) is fully transparent;
        an opaque image without a mask is transformed as a whole (img2img)."""
        self.check_n(body.n)
        limits = self._args.limits
        image = image_inputs.open_image(body.image, "image", limits)
        if body.mask is not None:
            mask_file = image_inputs.open_image(body.mask, "mask", limits)
            mask = image_inputs.transparent_area(mask_file)
            if mask is None:
                raise InvalidRequestError(
                    "mask has no fully transparent pixels; its transparent area marks what to edit",
                    param="mask",
                    code="invalid_mask",
                )
        else:
            mask = image_inputs.transparent_area(image)
        with _size_is_one_field():
            width, height = self._size_for(image, body.parsed_size(), "size")
            prepared = image_inputs.prepare(image, mask, (width, height))
            if mask is None:
                for name in ("mask_blur", "padding_mask_crop"):
                    if name in body.model_fields_set:
                        raise InvalidRequestError(
                            f"{name} needs a mask (or transparent pixels in image)", param=name, code="unsupported_value"
                        )
                return self._requests(body, "img2img", None, None, n=body.n, image=prepared, strength=body.strength)
            return self._requests(body, "inpaint", None, None, n=body.n, image=prepared, **_inpaint_options(body))

    def check_n(self, n: int) -> None:
        """Reject more images per request than `limits.max_n` (400 naming `n`)."""
        if n > self._args.limits.max_n:
            raise InvalidRequestError(f"n {n} is above the limit of {self._args.limits.max_n}", param="n", code="invalid_n")

    def _size_for(self, image: Any, requested: tuple[Optional[int], Optional[int]], param: str) -> tuple[int, int]:
        width, height = image_inputs.target_size(image.size, requested, self._args.limits, param)
        _check_multiple_of_8(width, height)
        return width, height

    def _requests(
        self,
        body: SDXLControls,
        kind: str,
        width: Optional[int],
        height: Optional[int],
        n: int = 1,
        image: Optional[image_inputs.PreparedImage] = None,
        **kind_fields: Any,
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
        _check_multiple_of_8(width, height)
        if image is not None:
            kind_fields.update(init_image=image.pixels, mask_image=image.mask)
        first_seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
        deadline = time.time() + self._args.ingress.engine_timeout_s
        try:
            requests = [
                GenerationRequest(
                    prompt=body.prompt,
                    negative_prompt=body.negative_prompt,
                    kind=kind,
                    width=width,
                    height=height,
                    num_inference_steps=body.num_inference_steps,
                    guidance_scale=body.guidance_scale,
                    scheduler=body.scheduler,
                    seed=(first_seed + i) % (MAX_SEED + 1),
                    deadline=deadline,
                    **kind_fields,
                ).with_defaults(self._args.model)
                for i in range(n)
            ]
        except ValidationError as exc:  # bounds the HTTP schema leaves to the contract
            raise invalid_request_from(exc.errors()) from None
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


def _check_multiple_of_8(width: Optional[int], height: Optional[int]) -> None:
    for name, side in (("width", width), ("height", height)):
        if side is not None and side % 8:
            raise InvalidRequestError(f"{name} {side} must be a multiple of 8", param=name, code="invalid_size")


def _inpaint_options(body: Any) -> dict[str, Any]:
    return {"strength": body.strength, "mask_blur": body.mask_blur, "padding_mask_crop": body.padding_mask_crop}


def _size_is_one_field():
    """The OpenAI endpoints name width and height together `size`: report errors under it."""
    return renamed_params(lambda param: "size" if param in ("width", "height") else param)
