"""GPU out-of-memory in the step engine, on the tiny model (fp32 CPU, no Ray): a UNet forward, a
VAE decode or a prompt encode that runs out of memory runs again as smaller calls (at bucket sizes
when there are buckets) and gives the images the requests get alone; a request that runs out of
memory alone fails with a 503 (`out_of_memory`) while its neighbours go on; the engine counts it
and keeps serving.

The GPU's limit is a test double (`MemoryLimit`): a forward pre-hook that raises
`torch.OutOfMemoryError` for inputs above a size, on the modules of a pipeline of this module's
own (the session's `tiny_pipe` is not touched)."""

import logging
from typing import Optional

import numpy as np
import pytest
import torch

from configs.model_spec import TinySpec
from deployments.engine.control import RequestControl, RunOutput
from deployments.engine.loop import StepEngine
from deployments.pipelines import load_pipeline
from deployments.types import GenerationRequest, InvalidRequestError, OverloadedError

FIDELITY_ATOL = 1e-4
SPEC = TinySpec(device="cpu")
SMALL = dict(width=64, height=64, num_inference_steps=3, guidance_scale=5.0, scheduler="euler")


class MemoryLimit:
    """A module's calls fail as a GPU out of memory would once their input is larger than `most`
    (None: no limit), counted in 64² images: batch rows × the latents' h × w / 8² for image
    tensors, batch rows for token ids. Records each call's batch rows and whether it failed."""

    def __init__(self, module: torch.nn.Module):
        self.most: Optional[float] = None
        self.calls: list[tuple[int, bool]] = []
        module.register_forward_pre_hook(self)

    def __call__(self, module, args):
        sample = args[0]
        size = sample.shape[0] * (sample.shape[-2] * sample.shape[-1] / 64 if sample.dim() == 4 else 1)
        failed = self.most is not None and size > self.most
        self.calls.append((sample.shape[0], failed))
        if failed:
            raise torch.OutOfMemoryError(f"CUDA out of memory (test double: {size} > {self.most})")


class Limits:
    def __init__(self, pipe):
        self.pipe = pipe
        self.unet = MemoryLimit(pipe.unet)
        self.decode = MemoryLimit(pipe.vae.decoder)
        self.encode_image = MemoryLimit(pipe.vae.encoder)
        self.encode_prompts = MemoryLimit(pipe.text_encoder)

    def reset(self):
        for limit in (self.unet, self.decode, self.encode_image, self.encode_prompts):
            limit.most, limit.calls = None, []


@pytest.fixture(scope="module")
def module_limits():
    return Limits(load_pipeline(SPEC))  # its own pipeline: the hooks stay there


@pytest.fixture
def limits(module_limits):
    module_limits.reset()
    yield module_limits
    module_limits.reset()


def _resolved(request: GenerationRequest) -> GenerationRequest:
    return request.with_defaults(SPEC)


def _alone(limits: Limits, requests: list[GenerationRequest]) -> list[np.ndarray]:
    """Each request's image run alone, before any memory limit is set."""
    engine = StepEngine(limits.pipe, max_rows=8)
    images = []
    for request in requests:
        (outcome,) = engine.generate([_resolved(request)])
        assert isinstance(outcome, RunOutput), outcome
        images.append(outcome.image)
    limits.reset()  # what the tests record starts after this
    return images


def _picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)


def _mixed() -> list[GenerationRequest]:
    """64² rows of every kind, with and without guidance, with several schedulers."""
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return [
        GenerationRequest(prompt="a red circle", seed=1, **{**SMALL, "num_inference_steps": 4}),
        GenerationRequest(prompt="a blue star", seed=2, **{**SMALL, "guidance_scale": 1.0, "scheduler": "dpmpp_2m_karras"}),
        GenerationRequest(prompt="cat", kind="img2img", init_image=_picture(3), strength=0.6, seed=3, **{**SMALL, "scheduler": "heun"}),
        GenerationRequest(prompt="fill", kind="inpaint", init_image=_picture(4), mask_image=mask, strength=0.9, seed=4, **{**SMALL, "scheduler": "euler_a"}),
        GenerationRequest(prompt="green", negative_prompt="blur", seed=5, **{**SMALL, "scheduler": "unipc"}),
    ]


def _assert_out_of_memory(outcome):
    assert isinstance(outcome, OverloadedError), outcome
    assert outcome.status_code == 503 and outcome.code == "out_of_memory"
    assert "too large for this GPU" in outcome.message


def test_calls_that_run_out_of_memory_are_split_and_give_the_images_of_each_request_alone(limits, caplog):
    requests = _mixed()
    alone = _alone(limits, requests)
    engine = StepEngine(limits.pipe, max_rows=8)
    limits.unet.most = 2  # one guided image (or two unguided) per UNet call
    limits.decode.most = 1  # one image per decode
    limits.encode_prompts.most = 1  # one prompt per text-encoder call
    progress = []
    controls = [
        engine.submit(_resolved(request), RequestControl(on_progress=(lambda step, total: progress.append(step)) if index == 0 else None))
        for index, request in enumerate(requests)
    ]
    with caplog.at_level(logging.WARNING, logger="deployments.engine.loop"):
        engine.run_until_idle()
    for request, control, image in zip(requests, controls, alone):
        assert isinstance(control.outcome, RunOutput), (request.prompt, control.outcome)
        assert np.abs(control.outcome.image - image).max() <= FIDELITY_ATOL, request.prompt
    assert progress == [1, 2, 3, 4]  # each step taken once, retries or not
    assert any(failed for _, failed in limits.unet.calls) and any(failed for _, failed in limits.decode.calls)
    assert any(failed for _, failed in limits.encode_prompts.calls)
    assert max(rows for rows, failed in limits.unet.calls if not failed) <= 2
    stats = engine.stats()
    assert stats["oom_splits"] > 0 and stats["oom_failures"] == 0
    assert stats["failed"] == 0 and stats["completed"] == len(requests)
    oom_lines = [record for record in caplog.records if "ran out of GPU memory" in record.getMessage()]
    assert oom_lines and all(record.exc_info is None for record in oom_lines)  # one line each, no traceback
    # one line per forward, decode or encode that ran out of memory, not one per failed call or row
    failed_calls = sum(failed for _, failed in limits.unet.calls + limits.decode.calls + limits.encode_prompts.calls)
    assert len(oom_lines) < failed_calls


def test_a_request_that_runs_out_of_memory_alone_fails_with_503_and_its_neighbours_go_on(limits):
    guided = GenerationRequest(prompt="guided", seed=1, **SMALL)
    plain = [GenerationRequest(prompt=f"plain {i}", seed=2 + i, **{**SMALL, "guidance_scale": 1.0}) for i in range(2)]
    alone = _alone(limits, [guided, *plain])
    engine = StepEngine(limits.pipe, max_rows=8)
    limits.unet.most = 1  # one UNet row: a guided image (two rows) never fits
    outcomes = engine.generate([_resolved(request) for request in (plain[0], guided, plain[1])])
    _assert_out_of_memory(outcomes[1])
    for outcome, image in zip((outcomes[0], outcomes[2]), alone[1:]):
        assert isinstance(outcome, RunOutput)
        assert np.abs(outcome.image - image).max() <= FIDELITY_ATOL
    stats = engine.stats()
    assert stats["oom_failures"] == 1 and stats["failed"] == 1 and stats["oom_splits"] >= 1
    assert stats["active"] == 0 and stats["completed"] == 2

    limits.unet.most = None  # memory is back: the engine serves the same request
    (outcome,) = engine.generate([_resolved(guided)])
    assert isinstance(outcome, RunOutput) and np.abs(outcome.image - alone[0]).max() <= FIDELITY_ATOL
    assert engine.stats()["completed"] == 3


def test_with_buckets_a_split_runs_at_the_bucket_below_the_one_that_failed(limits):
    """Buckets of 1 and 4 images: three guided images are one UNet call padded to 8 rows; halves
    (2 + 1 images) would pad back up to 8 and fail again, so the retry runs calls of 2 rows."""
    requests = [GenerationRequest(prompt=f"p{i}", seed=i, **SMALL) for i in range(3)]
    alone = _alone(limits, requests)
    engine = StepEngine(limits.pipe, max_rows=8, buckets=[1, 4])
    engine.forward_calls.costs = {2: 1.0, 8: 1.5}  # one padded call is the cheapest plan
    engine.decode_calls.costs = {1: 1.0, 4: 1.5}
    limits.unet.most = 2
    limits.decode.most = 1
    outcomes = engine.generate([_resolved(request) for request in requests])
    for outcome, image in zip(outcomes, alone):
        assert isinstance(outcome, RunOutput) and np.abs(outcome.image - image).max() <= FIDELITY_ATOL
    assert limits.unet.calls == [(8, True), (2, False), (2, False), (2, False)] * 3  # every step
    assert limits.decode.calls == [(4, True), (1, False), (1, False), (1, False)]
    stats = engine.stats()
    assert stats["oom_splits"] == 3 + 1 and stats["oom_failures"] == 0
    assert stats["unet_calls"] == 9 and stats["padded_unet_rows"] == 0  # failed calls are not counted


def test_at_the_smallest_bucket_there_is_nothing_smaller_to_run(limits):
    engine = StepEngine(limits.pipe, max_rows=8, buckets=[2])
    limits.unet.most = 2  # two guided images are 4 UNet rows, the smallest bucket: over the limit
    requests = [GenerationRequest(prompt=f"p{i}", seed=i, **SMALL) for i in range(2)]
    outcomes = engine.generate([_resolved(request) for request in requests])
    for outcome in outcomes:
        _assert_out_of_memory(outcome)
    assert limits.unet.calls == [(4, True)]  # each alone would run at the same padded size
    assert engine.stats()["oom_failures"] == 2 and engine.stats()["oom_splits"] == 0


def test_a_decode_that_runs_out_of_memory_alone_fails_that_request_only(limits):
    square = [GenerationRequest(prompt=f"square {i}", seed=i, **SMALL) for i in range(2)]
    wide = GenerationRequest(prompt="wide", seed=9, **{**SMALL, "width": 96})  # 1.5 images of memory
    alone = _alone(limits, square)
    engine = StepEngine(limits.pipe, max_rows=8)
    limits.decode.most = 1
    outcomes = engine.generate([_resolved(request) for request in (square[0], wide, square[1])])
    _assert_out_of_memory(outcomes[1])
    for outcome, image in zip((outcomes[0], outcomes[2]), alone):
        assert isinstance(outcome, RunOutput) and np.abs(outcome.image - image).max() <= FIDELITY_ATOL
    assert engine.stats()["oom_failures"] == 1 and engine.stats()["oom_splits"] == 1


def test_preparing_a_row_that_runs_out_of_memory_fails_that_request_with_503(limits):
    """An init image's VAE encode is a request's own: no split, a 503 for it alone."""
    text = GenerationRequest(prompt="text", seed=1, **SMALL)
    edit = GenerationRequest(prompt="edit", kind="img2img", init_image=_picture(1), strength=0.5, seed=2, **SMALL)
    engine = StepEngine(limits.pipe, max_rows=8)
    limits.encode_image.most = 0
    text_outcome, edit_outcome = engine.generate([_resolved(text), _resolved(edit)])
    _assert_out_of_memory(edit_outcome)
    assert isinstance(text_outcome, RunOutput)
    assert engine.stats()["oom_failures"] == 1 and engine.stats()["failed"] == 1


def test_an_upcast_vae_that_ran_out_of_memory_is_cast_back(limits):
    """An fp16 VAE with `force_upcast` runs each decode in float32: one that ran out of memory
    mid-call must not stay there (the next decode would get float16 latents and fail)."""
    vae = limits.pipe.vae
    vae.register_to_config(force_upcast=True)
    vae.to(dtype=torch.float16)
    try:
        engine = StepEngine(limits.pipe, max_rows=8)
        limits.decode.most = 1
        outcomes = engine.generate([_resolved(GenerationRequest(prompt=f"p{i}", seed=i, **SMALL)) for i in range(2)])
        assert all(isinstance(outcome, RunOutput) for outcome in outcomes)
        assert limits.decode.calls == [(2, True), (1, False), (1, False)]
        assert vae.dtype == torch.float16
    finally:
        vae.register_to_config(force_upcast=False)
        vae.to(dtype=torch.float32)


def test_a_typed_error_preparing_a_row_keeps_its_status(limits):
    """Preparation that raises a `ServiceError` (a 400 found only when the row is built) fails
    that request with that error, not a 500; its neighbour goes on."""

    def refuse(module, args):
        raise InvalidRequestError("init_image is not usable (test double)", param="init_image")

    text = GenerationRequest(prompt="text", seed=1, **SMALL)
    edit = GenerationRequest(prompt="edit", kind="img2img", init_image=_picture(1), strength=0.5, seed=2, **SMALL)
    engine = StepEngine(limits.pipe, max_rows=8)
    hook = limits.pipe.vae.encoder.register_forward_pre_hook(refuse)
    try:
        text_outcome, edit_outcome = engine.generate([_resolved(text), _resolved(edit)])
    finally:
        hook.remove()
    assert isinstance(edit_outcome, InvalidRequestError) and edit_outcome.status_code == 400
    assert edit_outcome.param == "init_image"
    assert isinstance(text_outcome, RunOutput) and engine.stats()["failed"] == 1
