"""The batch runner: fuses compatible requests into one pipeline call. Knows torch, not Ray or HTTP.

A batch arrives as a list of `GenerationRequest`s (whatever `@serve.batch` gathered). The runner
splits it into groups that share a compatibility key, and runs each group as **one** pipeline
call in which every request keeps its own prompt, negative prompt and seed (one `torch.Generator`
per request, so an image does not depend on its batch neighbours). A per-step callback reports
progress and honours cancel and deadline per request.
"""

import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from diffusers import (
    DiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from deployments.pipelines import make_scheduler
from deployments.types import (
    MAX_SEED,
    DeadlineExceededError,
    EngineError,
    GenerationRequest,
    RequestCancelledError,
    ServiceError,
)

logger = logging.getLogger(__name__)


#: The diffusers pipeline class of each kind; all are built over the same loaded components.
PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "txt2img": StableDiffusionXLPipeline,
    "img2img": StableDiffusionXLImg2ImgPipeline,
    "inpaint": StableDiffusionXLInpaintPipeline,
}


def compatibility_key(request: GenerationRequest) -> tuple:
    """What requests must share to run in one forward pass. New features add a field here.

    Everything else (prompt, negative prompt, seed, init image, mask, mask blur) is per request
    and batches freely. `padding_mask_crop` crops one region per pipeline call, so such a request
    only ever runs alone (its key includes its id).
    """
    crop = None if request.padding_mask_crop is None else (request.padding_mask_crop, request.request_id)
    return (
        request.kind,
        request.width,
        request.height,
        request.num_inference_steps,
        request.scheduler,
        request.guidance_scale,
        request.strength,
        crop,
    )


def group_by_key(requests: Sequence[GenerationRequest]) -> list[list[int]]:
    """Indices of `requests` grouped by compatibility key, groups in order of first arrival."""
    groups: dict[tuple, list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(compatibility_key(request), []).append(index)
    return list(groups.values())


class RequestControl:
    """Cancel flag, deadline and progress of one request, shared between threads.

    The serving side calls `cancel()` (from any thread); the runner reads `should_stop` at every
    denoising step and reports progress through `on_progress(step, total)`.
    """

    def __init__(
        self,
        deadline: Optional[float] = None,
        on_progress: Optional[Callable[[int, int], None]] = None,
    ):
        self.deadline = deadline
        self._on_progress = on_progress
        self._cancelled = threading.Event()
        self.step = 0
        self.total = 0

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: Optional[float] = None) -> bool:
        return self.deadline is not None and (now if now is not None else time.time()) >= self.deadline

    def should_stop(self, now: Optional[float] = None) -> bool:
        return self.cancelled or self.expired(now)

    def report(self, step: int, total: int) -> None:
        self.step, self.total = step, total
        if self._on_progress is not None:
            self._on_progress(step, total)

    def stop_error(self) -> ServiceError:
        """The error to answer for a request this control stopped."""
        if self.cancelled:
            return RequestCancelledError("the request was cancelled", code="cancelled")
        return DeadlineExceededError("the request passed its deadline", code="deadline_exceeded")


@dataclass
class RunOutput:
    """One request's image as float pixels in [0, 1], shape (H, W, 3), before any encoding."""

    image: np.ndarray
    seed: int
    batch_size: int
    run_s: float


Outcome = Union[RunOutput, ServiceError]


@dataclass(frozen=True)
class GroupReport:
    """What one fused pipeline call did; handed to the runner's `on_group` observer."""

    key: tuple
    size: int
    run_s: float
    steps_run: int
    total_steps: int
    #: The batch size the pipeline actually ran (`size` plus bucket padding).
    padded_size: int

    @property
    def interrupted(self) -> bool:
        """True when every request in the group stopped (cancel/deadline) before the last step."""
        return self.steps_run < self.total_steps


class BatchRunner:
    """Runs batches of requests on one pipeline. Not thread-safe: one batch at a time per runner.

    The pipeline's components (weights) are shared; each group call gets a fresh pipeline object
    with its own scheduler, so no scheduler state leaks between groups.
    """

    def __init__(
        self,
        pipeline: StableDiffusionXLPipeline,
        on_group: Optional[Callable[[GroupReport], None]] = None,
        buckets: Optional[Sequence[int]] = None,
    ):
        """`buckets`: batch sizes a pipeline call may have (compiled graphs exist for these).
        A group is split into the calls `plan_calls` picks, each padded up to the next bucket with
        throw-away copies of its last request."""
        self._base = pipeline
        self._on_group = on_group
        self._buckets = sorted(buckets) if buckets else None
        #: Seconds of one pipeline call at each bucket size. Until `warmup` measures them, a call
        #: is taken to cost its padded size (the same per image), which already avoids padding.
        self._bucket_costs: dict[int, float] = {size: float(size) for size in self._buckets or []}

    @property
    def bucket_costs(self) -> dict[int, float]:
        """Seconds of one pipeline call by bucket size (measured by `warmup`), or {} without buckets."""
        return dict(self._bucket_costs)

    def run(
        self,
        requests: Sequence[GenerationRequest],
        controls: Optional[Sequence[RequestControl]] = None,
    ) -> list[Outcome]:
        """One outcome per request, in order: a `RunOutput` or the `ServiceError` it ended with.

        Requests already cancelled or past their deadline are answered without running.
        Requests must have their defaults resolved (`GenerationRequest.with_defaults`).
        """
        for request in requests:
            if not _is_resolved(request):
                raise ValueError(
                    f"request {request.request_id} has unresolved settings; call with_defaults(spec) first"
                )
        if controls is None:
            controls = [RequestControl() for _ in requests]
        outcomes: list[Optional[Outcome]] = [None] * len(requests)
        for indices in group_by_key(requests):
            live = []
            for index in indices:
                if controls[index].should_stop():
                    outcomes[index] = controls[index].stop_error()
                else:
                    live.append(index)
            if not live:
                continue
            sizes = plan_calls(len(live), self._bucket_costs) if self._bucket_costs else [len(live)]
            start = 0
            for size in sizes:
                part, start = live[start : start + size], start + size
                group = self._run_group([requests[i] for i in part], [controls[i] for i in part])
                for index, outcome in zip(part, group):
                    outcomes[index] = outcome
        return outcomes  # type: ignore[return-value]

    def warmup(self, requests: Sequence[GenerationRequest]) -> None:
        """Run each (resolved) request once at every bucket size, so compilation happens at load
        time rather than on the first user's request. Then time one more call of the first request
        at each bucket size: the costs groups are split by."""
        for request in requests:
            for size in self._buckets or [1]:
                self.run(_copies(request, size))
        if self._buckets and requests:
            costs = {}
            for size in self._buckets:
                batch = _copies(requests[0], size)
                started = time.perf_counter()
                self._run_group(batch, [RequestControl() for _ in batch])
                costs[size] = time.perf_counter() - started
            self._bucket_costs = costs
            logger.info("pipeline call seconds by batch bucket: %s", {k: round(v, 3) for k, v in costs.items()})

    def _run_group(
        self, requests: list[GenerationRequest], controls: list[RequestControl]
    ) -> list[Outcome]:
        first = requests[0]
        seeds = [r.seed if r.seed is not None else secrets.randbelow(MAX_SEED + 1) for r in requests]
        real = len(requests)
        # A crop call takes one image (its key keeps it alone): never pad it.
        padded = real if first.padding_mask_crop is not None else self._padded_size(real)
        if padded > real:  # copies of the last request; their images are dropped
            requests = requests + [requests[-1]] * (padded - real)
            seeds = seeds + [seeds[-1]] * (padded - real)
        # CPU generators: the same seed gives the same starting noise on any device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        pipe = self._pipeline_for(first)
        callback = _StepCallback(controls)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                embeds = self._encode_prompts(pipe, requests)
                images = pipe(
                    **embeds,
                    **_kind_inputs(pipe, requests),
                    num_inference_steps=first.num_inference_steps,
                    guidance_scale=first.guidance_scale,
                    generator=generators,
                    # diffusers pastes a cropped repaint back only into PIL images.
                    output_type="np" if first.padding_mask_crop is None else "pil",
                    callback_on_step_end=callback,
                ).images
            images = [np.asarray(image, dtype=np.float32) / 255.0 if isinstance(image, Image.Image) else image for image in images]
        except Exception:  # one failing group must not take the others down
            logger.exception("pipeline call failed for %d request(s), key %s", real, compatibility_key(first))
            return [EngineError("image generation failed on the engine", code="engine_error")] * real
        run_s = time.perf_counter() - started
        if self._on_group is not None:
            self._on_group(
                GroupReport(compatibility_key(first), real, run_s, callback.steps_run, pipe.num_timesteps, padded)
            )
        outcomes: list[Outcome] = []
        for image, seed, control in zip(images[:real], seeds, controls):
            if control.should_stop():
                outcomes.append(control.stop_error())
            else:
                outcomes.append(RunOutput(image=image, seed=seed, batch_size=real, run_s=run_s))
        return outcomes

    def _padded_size(self, size: int) -> int:
        if not self._buckets:
            return size
        return next((bucket for bucket in self._buckets if bucket >= size), size)

    def _pipeline_for(self, request: GenerationRequest) -> DiffusionPipeline:
        # A fresh pipeline object of the request's kind over the shared components (cheap: no
        # weights are copied, as with diffusers' `from_pipe`); it owns the one piece of per-call
        # state, the scheduler.
        base = self._base
        components = dict(base.components)
        components["scheduler"] = make_scheduler(request.scheduler, base.scheduler.config)
        pipe = PIPELINE_CLASSES[request.kind](
            **components,
            force_zeros_for_empty_prompt=base.config.force_zeros_for_empty_prompt,
            add_watermarker=getattr(base, "watermark", None) is not None,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @staticmethod
    def _encode_prompts(pipe: StableDiffusionXLPipeline, requests: list[GenerationRequest]) -> dict:
        """Text embeddings of the whole group in one encoder pass, each request's own prompts.

        A request without a negative prompt gets what the plain pipeline gives it alone: zeros when
        the model sets `force_zeros_for_empty_prompt`, else the empty prompt's embedding.
        """
        use_cfg = requests[0].guidance_scale > 1.0
        prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=[r.prompt for r in requests],
            device=pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=use_cfg,
            negative_prompt=[r.negative_prompt or "" for r in requests],
        )
        if use_cfg and pipe.config.force_zeros_for_empty_prompt:
            for row, request in enumerate(requests):
                if request.negative_prompt is None:
                    negative_embeds[row].zero_()
                    negative_pooled[row].zero_()
        embeds = {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
        if use_cfg:
            embeds.update(negative_prompt_embeds=negative_embeds, negative_pooled_prompt_embeds=negative_pooled)
        return embeds


def plan_calls(count: int, bucket_costs: dict[int, float]) -> list[int]:
    """How many requests each pipeline call of a group of `count` takes, at the least total cost.

    A call of k requests is padded to the smallest bucket >= k and costs that bucket's seconds.
    With buckets [1, 8] on an H100 (1.15 s and 8.1 s), five requests are cheaper as five calls of
    one than as one call padded to eight; eight go in one call. Ties go to fewer calls. The whole
    batch answers when its last call ends, so the least total cost is also the least latency.
    """
    buckets = sorted(bucket_costs)
    cost_of = [0.0] + [bucket_costs[next(b for b in buckets if b >= k)] for k in range(1, buckets[-1] + 1)]
    # best[m]: (cost, number of calls, first call's size) for m requests.
    best: list[tuple[float, int, int]] = [(0.0, 0, 0)]
    for m in range(1, count + 1):
        best.append(
            min(
                (best[m - k][0] + cost_of[k], best[m - k][1] + 1, k)
                for k in range(1, min(m, buckets[-1]) + 1)
            )
        )
    sizes = []
    while count:
        sizes.append(best[count][2])
        count -= best[count][2]
    return sorted(sizes, reverse=True)


def _copies(request: GenerationRequest, size: int) -> list[GenerationRequest]:
    return [request.model_copy(update={"request_id": f"warmup-{size}-{i}"}) for i in range(size)]


def _is_resolved(request: GenerationRequest) -> bool:
    settings = (request.width, request.height, request.num_inference_steps, request.scheduler, request.guidance_scale)
    return None not in settings and (request.kind == "txt2img" or request.strength is not None)


def _kind_inputs(pipe: DiffusionPipeline, requests: list[GenerationRequest]) -> dict:
    """The pipeline arguments that depend on the kind: size, init images, masks, strength."""
    first = requests[0]
    if first.kind == "txt2img":
        return {"height": first.height, "width": first.width}
    # The strength that makes diffusers run `denoising_steps()` steps: at least one, where
    # int(steps × strength) would be 0 (the factor keeps the float product from rounding below 1).
    steps = first.num_inference_steps
    strength = first.strength if int(steps * first.strength) >= 1 else (1 + 1e-6) / steps
    inputs = {"image": [Image.fromarray(r.init_image) for r in requests], "strength": strength}
    if first.kind == "inpaint":
        masks = [Image.fromarray(r.mask_image) for r in requests]
        inputs["mask_image"] = [
            VaeImageProcessor.blur(mask, blur_factor=r.mask_blur) if r.mask_blur else mask
            for mask, r in zip(masks, requests)
        ]
        # One crop region per call: the key keeps such requests alone, so pass single images.
        if first.padding_mask_crop is not None:
            inputs.update(image=inputs["image"][0], mask_image=inputs["mask_image"][0])
            inputs["padding_mask_crop"] = first.padding_mask_crop
        inputs.update(height=first.height, width=first.width)
    return inputs


class _StepCallback:
    """`callback_on_step_end`: progress for every request; stop the call when all have stopped.

    A request cancelled while others in its group still run keeps its row until the call ends (its
    image is then dropped), so its neighbours' images do not change.
    """

    tensor_inputs: list[str] = []

    def __init__(self, controls: list[RequestControl]):
        self._controls = controls
        self.steps_run = 0

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        total = pipe.num_timesteps
        now = time.time()
        self.steps_run = step + 1
        for control in self._controls:
            control.report(step + 1, total)
        if all(control.should_stop(now) for control in self._controls):
            pipe._interrupt = True
        return callback_kwargs
