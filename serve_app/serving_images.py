"""Serving logic of the image endpoints: HTTP bodies -> `GenerationRequest`s -> engine -> results.

No HTTP here (that is `http_app.py`) and no torch: this module validates against the configured
limits, draws seeds, fans `n` images out as separate requests (the engine batches them again),
picks the engine a request needs from the registry of engine handles, and waits for it within the
configured timeout.
"""

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from pydantic import ValidationError

from configs.app_args import AppArgs
from deployments.types import (
    BASE_ROLE,
    MAX_SEED,
    ControlRef,
    DeadlineExceededError,
    GenerationRequest,
    GenerationResult,
    InvalidRequestError,
    ModelNotFoundError,
    check_limits,
    draw_seed,
    engine_handle,
    engine_role,
    refiner_handle,
)
from serve_app import image_inputs
from serve_app.errors import engine_call_error, invalid_request_from, renamed_params
from serve_app.protocol import (
    ImageEditRequest,
    ImageGenerationRequest,
    controlnet_list,
)


@dataclass
class Generated:
    """The results of one HTTP request's images and where their time went (seconds)."""

    results: list[GenerationResult]
    #: `time.perf_counter()` when the engine calls went out.
    sent_at: float
    #: From the engine calls being sent to the last result arriving: routing, the engine's queue
    #: and its run (the engine reports the run, so the rest is waiting).
    engine_s: float

    @property
    def run_s(self) -> float:
        return max(result.timings["run_s"] for result in self.results)

    @property
    def queue_s(self) -> float:
        """Waiting before the engine ran the images: the handle's queue, the replica's queue,
        batching and transfers."""
        return max(0.0, self.engine_s - self.run_s)


class ImageServing:
    """Turns validated HTTP bodies into engine calls; one instance per ingress replica."""

    def __init__(self, engines: Mapping[str, Any], args: AppArgs, loras: Any):
        """`loras`: what checks the LoRAs a request names (`LoraServing.check_request`)."""
        if BASE_ROLE not in engines:
            raise ValueError(f"the engine registry needs a {BASE_ROLE!r} engine; it has {sorted(engines)}")
        self._controlnet_roles = args.controlnet_roles()
        missing = sorted(set(self._controlnet_roles.values()) - set(engines))
        if missing:
            raise ValueError(f"the engine registry lacks the ControlNet deployments {missing}; it has {sorted(engines)}")
        self._engines = dict(engines)
        self._args = args
        self._loras = loras

    @property
    def model_id(self) -> str:
        return self._args.model.name

    @property
    def engines(self) -> dict[str, Any]:
        """The engine handles by role."""
        return dict(self._engines)

    def engine_for(self, request: GenerationRequest) -> Any:
        """The handle that serves `request`: its role's engine, preferring a replica that holds
        its LoRA set (Ray Serve's multiplexed routing)."""
        return engine_handle(self._engines, request, self._controlnet_roles, self._args.loras.routing)

    # Each `requests_for_*` builds the engine requests of a body for `owner` (the API key's
    # tenant; None: everyone), whose LoRAs it may name.

    def requests_for_generations(self, body: ImageGenerationRequest, owner: Optional[str] = None) -> list[GenerationRequest]:
        self.check_n(body.n)
        with _size_is_one_field():
            width, height = _checked_size(body.parsed_size())
            return self._requests(body, "txt2img", width, height, n=body.n, owner=owner, refiner=body.refiner, hires=body.hires)

    def requests_for_txt2img(self, body: Any, n: int = 1, owner: Optional[str] = None) -> list[GenerationRequest]:
        return self._requests(body, "txt2img", body.width, body.height, n=n, owner=owner, refiner=body.refiner, hires=body.hires)

    def requests_for_img2img(self, body: Any, n: int = 1, owner: Optional[str] = None) -> list[GenerationRequest]:
        image = image_inputs.open_image(body.image, "image", self._args.limits)
        width, height = image_inputs.target_size(image.size, (body.width, body.height), self._args.limits, "image")
        prepared = image_inputs.prepare(image, None, (width, height))
        return self._requests(
            body, "img2img", None, None, n=n, owner=owner, image=prepared, strength=body.strength, refiner=body.refiner
        )

    def requests_for_inpaint(self, body: Any, n: int = 1, owner: Optional[str] = None) -> list[GenerationRequest]:
        limits = self._args.limits
        image = image_inputs.open_image(body.image, "image", limits)
        mask = image_inputs.greyscale_mask(image_inputs.open_image(body.mask, "mask", limits))
        width, height = image_inputs.target_size(image.size, (body.width, body.height), limits, "image")
        prepared = image_inputs.prepare(image, mask, (width, height))
        return self._requests(body, "inpaint", None, None, n=n, owner=owner, image=prepared, **_inpaint_options(body))

    def requests_for_edit(self, body: ImageEditRequest, owner: Optional[str] = None) -> list[GenerationRequest]:
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
            size = _checked_size(body.parsed_size())
            width, height = image_inputs.target_size(image.size, size, limits, "size")
            prepared = image_inputs.prepare(image, mask, (width, height))
            if mask is None:
                for name in ("mask_blur", "padding_mask_crop"):
                    if name in body.model_fields_set:
                        raise InvalidRequestError(
                            f"{name} needs a mask (or transparent pixels in image)", param=name, code="unsupported_value"
                        )
                return self._requests(body, "img2img", None, None, n=body.n, owner=owner, image=prepared, strength=body.strength)
            return self._requests(body, "inpaint", None, None, n=body.n, owner=owner, image=prepared, **_inpaint_options(body))

    def check_n(self, n: int) -> None:
        """Reject more images per request than `limits.max_n` (400 naming `n`)."""
        if n > self._args.limits.max_n:
            raise InvalidRequestError(f"n {n} is above the limit of {self._args.limits.max_n}", param="n", code="invalid_n")

    def _requests(
        self,
        body: Any,
        kind: str,
        width: Optional[int],
        height: Optional[int],
        n: int = 1,
        image: Optional[image_inputs.PreparedImage] = None,
        owner: Optional[str] = None,
        **kind_fields: Any,
    ) -> list[GenerationRequest]:
        if body.model is not None and body.model != self.model_id:
            raise ModelNotFoundError(
                f"model {body.model!r} does not exist here; available: {self.model_id!r}",
                param="model",
                code="model_not_found",
            )
        if image is not None:
            kind_fields.update(init_image=image.pixels, mask_image=image.mask)
        controlnets = controlnet_list(body.controlnet)
        if controlnets:
            pictures = [
                image_inputs.open_image(control.image, f"controlnet.{index}.image", self._args.limits)
                for index, control in enumerate(controlnets)
            ]
            if image is not None:
                size = image.pixels.shape[1], image.pixels.shape[0]
            else:  # the first control image sets the size when nothing else does
                size = image_inputs.target_size(pictures[0].size, (width, height), self._args.limits, "controlnet.0.image")
                width, height = size
            kind_fields["controlnets"] = tuple(
                ControlRef(**control.model_dump(exclude={"image"}, exclude_unset=True), image=image_inputs.rgb_pixels(picture, size))
                for control, picture in zip(controlnets, pictures)
            )
        first_seed = body.seed if body.seed is not None else draw_seed()
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
                    guidance_end=body.guidance_end,
                    deep_cache_interval=body.deep_cache_interval,
                    scheduler=body.scheduler,
                    timestep_spacing=body.timestep_spacing,
                    loras=body.loras,
                    seed=(first_seed + i) % (MAX_SEED + 1),
                    deadline=deadline,
                    **kind_fields,
                ).with_defaults(self._args.model)
                for i in range(n)
            ]
        except ValidationError as exc:  # bounds the HTTP schema leaves to the contract
            with renamed_params(_controlnet_param):
                raise invalid_request_from(exc.errors()) from None
        check_limits(requests[0], self._args.limits)
        with renamed_params(_controlnet_param):  # a served name, hosted together: before any engine work
            engine_role(requests[0], self._controlnet_roles)
        refiner_handle(self._engines, requests[0])  # a 400 when it asks for a refiner none serves
        self._loras.check_request(body.loras, owner=owner)  # after the count limit: a long list is a 400, not 404s
        return requests

    async def generate(self, requests: list[GenerationRequest]) -> Generated:
        """Run all requests concurrently on their engines; all succeed or the first error is raised
        (the others are cancelled) by their deadline (504 after). Handle and replica failures
        become 503s with `Retry-After`."""
        sent = time.perf_counter()
        deadline = requests[0].deadline
        timeout_s = self._args.ingress.engine_timeout_s if deadline is None else max(0.0, deadline - time.time())
        responses, finals = [], []
        try:
            for request in requests:  # a full handle queue may refuse at `.remote()` already
                responses.append(self.engine_for(request).generate.remote(request))
                refiner = refiner_handle(self._engines, request)
                if refiner is not None:
                    # The base's response goes to the refiner as it is: Ray hands its result (the
                    # latents) from one replica to the other, not through this one.
                    responses.append(refiner.generate.remote(request, responses[-1]))
                finals.append(responses[-1])
            results = await asyncio.wait_for(asyncio.gather(*finals), timeout=timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceededError(f"the images were not ready within {timeout_s:.0f}s", code="timeout") from None
        except Exception as exc:  # noqa: BLE001 - mapped to the one error type a client sees
            raise engine_call_error(exc) from None
        finally:
            for response in responses:  # no-op for finished ones; frees the engine for the rest
                with contextlib.suppress(Exception):  # a refused call's cancel re-raises its refusal
                    response.cancel()
        return Generated(results=results, sent_at=sent, engine_s=time.perf_counter() - sent)


def _controlnet_param(param: Optional[str]) -> Optional[str]:
    """The contract's `controlnets.i...` is the HTTP body's `controlnet.i...`."""
    return param.replace("controlnets", "controlnet", 1) if param and param.startswith("controlnets") else param


def _checked_size(size: tuple[Optional[int], Optional[int]]) -> tuple[Optional[int], Optional[int]]:
    for name, side in zip(("width", "height"), size):
        if side is not None and side % 8:
            raise InvalidRequestError(f"{name} {side} must be a multiple of 8", param=name, code="invalid_size")
    return size


def _inpaint_options(body: Any) -> dict[str, Any]:
    return {"strength": body.strength, "mask_blur": body.mask_blur, "padding_mask_crop": body.padding_mask_crop}


def _size_is_one_field():
    """The OpenAI endpoints name width and height together `size`: report errors under it."""
    return renamed_params(lambda param: "size" if param in ("width", "height") else param)
