"""The step engine on the tiny model (fp32 CPU, no Ray): fidelity against plain diffusers, rows
joining and leaving a running batch, cancel, deadline, the two admission policies, buckets."""

import gc
import threading
import time
from typing import Callable

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from configs.model_spec import TinySpec
from configs.schedulers import SCHEDULERS
from deployments.engine.calls import SERVED_MIN, SERVED_WINDOW, CallPlanner, plan_calls
from deployments.engine.control import RequestControl, RunOutput
from deployments.engine.gc_pauses import GcPauses
from deployments.engine.loop import StepEngine, cuda_allocator_counts, settled_rounds
from deployments.engine.sharing import forward_key
from deployments.pipelines import make_scheduler
from deployments.types import (
    DeadlineExceededError,
    EngineError,
    GenerationRequest,
    OverloadedError,
    RequestCancelledError,
)

FIDELITY_ATOL = 1e-4
SPEC = TinySpec(device="cpu")
SMALL = dict(width=64, height=64, num_inference_steps=3, guidance_scale=5.0, scheduler="euler")
EDIT = dict(num_inference_steps=4, guidance_scale=5.0, scheduler="euler_a", width=64, height=64)


@pytest.fixture(scope="module")
def reference_pipe(tiny_dir):
    """A plain diffusers pipeline loaded independently from the same folder: the ground truth."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = pipe.scheduler.config  # each test swaps the scheduler
    return pipe


@pytest.fixture(scope="module")
def engine(tiny_pipe):
    return StepEngine(tiny_pipe, max_rows=16)


def _resolved(request: GenerationRequest) -> GenerationRequest:
    return request.with_defaults(SPEC)


def _run(engine: StepEngine, requests: list[GenerationRequest]) -> list:
    return engine.generate([_resolved(request) for request in requests])


def _alone(engine: StepEngine, request: GenerationRequest) -> np.ndarray:
    (outcome,) = _run(engine, [request])
    assert isinstance(outcome, RunOutput), outcome
    return outcome.image


def _reference_image(pipe, request: GenerationRequest) -> np.ndarray:
    pipe.scheduler = make_scheduler(request.scheduler, pipe.original_scheduler_config)
    return pipe(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        width=request.width,
        height=request.height,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="np",
    ).images[0]


def _picture(seed: int, size=(64, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def _square_mask(size=(64, 64)) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return mask


# --- fidelity: every request equals plain diffusers run alone ----------------------------------


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_each_scheduler_matches_plain_diffusers(engine, reference_pipe, scheduler):
    request = GenerationRequest(prompt="a red circle", negative_prompt="blurry", seed=7, **{**SMALL, "scheduler": scheduler})
    (ours,) = _run(engine, [request])
    assert isinstance(ours, RunOutput) and ours.image.shape == (64, 64, 3)
    assert np.abs(ours.image - _reference_image(reference_pipe, request)).max() <= FIDELITY_ATOL


def test_missing_negative_prompt_matches_plain_pipeline_default(engine, reference_pipe):
    """No negative prompt = diffusers' `negative_prompt=None` (zeroed embeddings), not ''."""
    none_request = GenerationRequest(prompt="a blue square", seed=3, **SMALL)
    empty_request = none_request.model_copy(update={"negative_prompt": ""})
    none_image, empty_image = (outcome.image for outcome in _run(engine, [none_request, empty_request]))
    assert np.abs(none_image - _reference_image(reference_pipe, none_request)).max() <= FIDELITY_ATOL
    assert np.abs(empty_image - _reference_image(reference_pipe, empty_request)).max() <= FIDELITY_ATOL
    assert np.abs(none_image - empty_image).max() > 1e-3


def test_no_guidance_runs_one_unet_row(engine, reference_pipe):
    request = GenerationRequest(prompt="a lake", seed=5, **{**SMALL, "guidance_scale": 1.0})
    before = engine.stats()["unet_rows"]
    (ours,) = _run(engine, [request])
    assert engine.stats()["unet_rows"] - before == 3  # one row per step, no unconditional row
    assert np.abs(ours.image - _reference_image(reference_pipe, request)).max() <= FIDELITY_ATOL


def _edit_reference(pipe, request: GenerationRequest, strength=None, **extra) -> np.ndarray:
    pipe.scheduler = make_scheduler(request.scheduler, pipe.original_scheduler_config)
    return pipe(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        image=Image.fromarray(request.init_image),
        strength=strength or request.strength,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        **extra,
    ).images[0]


def _reference_of_kind(pipeline_class, reference_pipe):
    """Plain diffusers' pipeline of another kind over the reference's components."""
    pipe = pipeline_class.from_pipe(reference_pipe)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = reference_pipe.original_scheduler_config
    return pipe


@pytest.fixture(scope="module")
def img2img_reference(reference_pipe):
    return _reference_of_kind(StableDiffusionXLImg2ImgPipeline, reference_pipe)


@pytest.fixture(scope="module")
def inpaint_reference(reference_pipe):
    return _reference_of_kind(StableDiffusionXLInpaintPipeline, reference_pipe)


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m_karras", "ddim", "heun"])
def test_img2img_matches_plain_diffusers(engine, img2img_reference, scheduler):
    request = GenerationRequest(
        prompt="a red circle", negative_prompt="blur", kind="img2img", init_image=_picture(1), strength=0.6, seed=4,
        **{**EDIT, "scheduler": scheduler},
    )
    (ours,) = _run(engine, [request])
    assert np.abs(ours.image - _edit_reference(img2img_reference, request, output_type="np")).max() <= FIDELITY_ATOL


def test_fewer_than_one_step_runs_the_last_step(engine, img2img_reference):
    """steps 4 × strength 0.2 < 1: diffusers runs nothing (and fails); the engine runs the last
    step, exactly as diffusers does at strength 0.25."""
    seen = []
    request = _resolved(
        GenerationRequest(prompt="p", kind="img2img", init_image=_picture(2), strength=0.2, seed=8, **EDIT)
    )
    control = engine.submit(request, RequestControl(on_progress=lambda step, total: seen.append((step, total))))
    engine.run_until_idle()
    assert seen == [(1, 1)]
    expected = _edit_reference(img2img_reference, request, strength=0.25, output_type="np")
    assert np.abs(control.outcome.image - expected).max() <= FIDELITY_ATOL


@pytest.mark.parametrize("mask_blur, strength", [(0, 0.8), (6, 1.0)])
def test_inpaint_matches_plain_diffusers(engine, inpaint_reference, mask_blur, strength):
    request = GenerationRequest(
        prompt="a blue square", kind="inpaint", init_image=_picture(2), mask_image=_square_mask(),
        strength=strength, mask_blur=mask_blur, seed=9, **EDIT,
    )
    (ours,) = _run(engine, [request])
    mask = Image.fromarray(request.mask_image)
    mask = VaeImageProcessor.blur(mask, blur_factor=mask_blur) if mask_blur else mask
    expected = _edit_reference(inpaint_reference, request, mask_image=mask, height=64, width=64, output_type="np")
    assert np.abs(ours.image - expected).max() <= FIDELITY_ATOL


def test_inpaint_full_resolution_crop_matches_plain_diffusers(engine, inpaint_reference):
    request = GenerationRequest(
        prompt="a star", kind="inpaint", init_image=_picture(3), mask_image=_square_mask(),
        strength=0.9, padding_mask_crop=4, seed=5, **EDIT,
    )
    (ours,) = _run(engine, [request])
    expected = _edit_reference(
        inpaint_reference, request, mask_image=Image.fromarray(request.mask_image), padding_mask_crop=4,
        height=64, width=64, output_type="pil",
    )
    assert np.abs(ours.image - np.asarray(expected, dtype=np.float32) / 255.0).max() <= FIDELITY_ATOL
    outside = request.mask_image == 0  # the paste-back keeps the unmasked pixels exactly
    assert np.array_equal((ours.image[outside] * 255).round().astype(np.uint8), request.init_image[outside])


# --- sharing a forward ------------------------------------------------------------------------


def _mixed() -> list[GenerationRequest]:
    """Different steps, guidance (with and without), schedulers, strengths, kinds, crops, sizes."""
    return [
        GenerationRequest(prompt="a red circle", seed=1, **{**SMALL, "num_inference_steps": 6}),
        GenerationRequest(prompt="a blue star", negative_prompt="x", seed=2, **{**SMALL, "scheduler": "dpmpp_2m_karras", "guidance_scale": 1.0}),
        GenerationRequest(prompt="cat", kind="img2img", init_image=_picture(5), strength=0.5, seed=3, **{**EDIT, "num_inference_steps": 8, "guidance_scale": 7.0}),
        GenerationRequest(prompt="fill", kind="inpaint", init_image=_picture(6), mask_image=_square_mask(), strength=0.9, mask_blur=2, seed=4, **{**EDIT, "scheduler": "heun"}),
        GenerationRequest(prompt="crop", kind="inpaint", init_image=_picture(7), mask_image=_square_mask(), strength=0.7, padding_mask_crop=2, seed=5, **{**EDIT, "scheduler": "unipc"}),
        GenerationRequest(prompt="tall", seed=6, **{**SMALL, "height": 96, "scheduler": "ddim"}),
    ]


def test_a_request_without_a_negative_prompt_runs_each_text_encoder_once(engine, tiny_pipe):
    """SDXL zeroes the unconditional embeddings of a request without a negative prompt, so the
    empty negative prompt is not encoded (an H200 spent 0.05-0.07 s of a lone request there)."""
    calls = []
    hooks = [encoder.register_forward_hook(lambda *_: calls.append(1)) for encoder in (tiny_pipe.text_encoder, tiny_pipe.text_encoder_2)]
    try:
        _alone(engine, GenerationRequest(prompt="a red circle", seed=1, **SMALL))
        assert len(calls) == 2  # one pass of each encoder: the prompt
        _alone(engine, GenerationRequest(prompt="a red circle", negative_prompt="blur", seed=1, **SMALL))
        assert len(calls) == 6  # and the negative prompt's
    finally:
        for hook in hooks:
            hook.remove()


def test_a_heterogeneous_batch_gives_each_row_its_solo_image(engine):
    requests = _mixed()
    alone = [_alone(engine, request) for request in requests]
    before = engine.stats()
    together = _run(engine, requests)
    after = engine.stats()
    new_forwards = after["rows_per_forward"][len(before["rows_per_forward"]) :]
    assert max(new_forwards) == 5  # every 64² row shared a forward; the 64x96 one ran beside them
    assert after["forward_s"] > before["forward_s"]  # the busy time benchmarks size replicas by
    assert after["encode_s"] > before["encode_s"]  # the prompts' share of a lone request's queue_s
    for request, outcome, image in zip(requests, together, alone):
        assert outcome.batch_size == (1 if request.height == 96 else 5)
        assert np.abs(outcome.image - image).max() <= FIDELITY_ATOL, request.prompt


def test_a_request_that_joins_at_step_k_equals_it_alone(engine):
    long = _resolved(GenerationRequest(prompt="long", seed=11, **{**SMALL, "num_inference_steps": 20}))
    joiners = _mixed()
    alone = [_alone(engine, request) for request in joiners]
    before = engine.stats()["admitted_into_running"]
    first = engine.submit(long)
    for _ in range(3):
        engine.step()
    assert first.step == 3
    late = [engine.submit(_resolved(request)) for request in joiners]
    engine.run_until_idle()
    assert engine.stats()["admitted_into_running"] - before == len(joiners)
    for request, control, image in zip(joiners, late, alone):
        assert control.outcome.batch_size >= (1 if request.height == 96 else 2)
        assert np.abs(control.outcome.image - image).max() <= FIDELITY_ATOL
    assert np.abs(first.outcome.image - _alone(engine, long)).max() <= FIDELITY_ATOL


def test_the_sharing_rule_is_the_latent_shape():
    assert forward_key((1, 4, 8, 8)) == forward_key((1, 4, 8, 8))
    assert forward_key((1, 4, 8, 8)) != forward_key((1, 4, 8, 12))


def test_all_kinds_share_one_set_of_weights(engine, tiny_pipe):
    pipes = [engine._rows.pipeline_for(_resolved(request)) for request in _mixed()[:4]]
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for pipe in pipes:
            assert getattr(pipe, part) is getattr(tiny_pipe, part)
    assert len({id(pipe.scheduler) for pipe in pipes}) == 4  # but each row its own scheduler
    assert {type(pipe).__name__ for pipe in pipes} == {
        "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
    }


# --- cancel, deadline, progress --------------------------------------------------------------


def test_a_cancelled_row_is_dropped_at_once_and_its_neighbours_are_unchanged(engine):
    keep = _resolved(GenerationRequest(prompt="keep me", seed=11, **{**SMALL, "num_inference_steps": 6}))
    drop = _resolved(keep.model_copy(update={"prompt": "drop me", "seed": 12, "request_id": "drop"}))
    alone = _alone(engine, keep)
    kept, dropped = engine.submit(keep), engine.submit(drop)
    engine.step()
    engine.step()
    dropped.cancel()
    engine.step()
    assert isinstance(dropped.outcome, RequestCancelledError) and dropped.step == 2  # at the next step
    engine.run_until_idle()
    assert np.abs(kept.outcome.image - alone).max() <= FIDELITY_ATOL


def test_cancelled_before_admission_never_runs(engine):
    before = engine.stats()
    control = RequestControl()
    control.cancel()
    engine.submit(_resolved(GenerationRequest(prompt="p", seed=1, **SMALL)), control)
    engine.run_until_idle()
    assert isinstance(control.outcome, RequestCancelledError) and control.outcome.status_code == 409
    assert engine.stats()["admitted"] == before["admitted"]


def test_a_deadline_passing_mid_run_answers_504_at_the_next_step(engine):
    control = RequestControl(on_progress=lambda step, total: setattr(control, "deadline", time.time() - 1) if step == 2 else None)
    engine.submit(_resolved(GenerationRequest(prompt="p", seed=1, **{**SMALL, "num_inference_steps": 10})), control)
    engine.run_until_idle()
    assert isinstance(control.outcome, DeadlineExceededError) and control.step == 2


def test_cancel_from_another_thread(engine):
    stop = threading.Event()
    loop = threading.Thread(target=engine.run, args=(stop,))
    loop.start()
    try:
        started = threading.Event()
        control = RequestControl(on_progress=lambda step, total: started.set())
        engine.submit(_resolved(GenerationRequest(prompt="p", seed=1, **{**SMALL, "num_inference_steps": 500})), control)
        assert started.wait(30)
        control.cancel()
        assert isinstance(control.wait(30), RequestCancelledError) and control.step < 500
    finally:
        stop.set()
        loop.join(10)


def test_progress_counts_the_steps_a_row_runs(engine):
    seen = []
    request = GenerationRequest(prompt="p", kind="img2img", init_image=_picture(1), strength=0.5, seed=1, **{**EDIT, "num_inference_steps": 10})
    engine.submit(_resolved(request), RequestControl(on_progress=lambda step, total: seen.append((step, total))))
    engine.run_until_idle()
    assert seen == [(step, 5) for step in range(1, 6)]


def test_an_unresolved_request_is_refused(engine):
    with pytest.raises(ValueError, match="with_defaults"):
        engine.submit(GenerationRequest(prompt="p"))


# --- policies and bounds ----------------------------------------------------------------------


def test_step_scheduling_lets_a_short_request_finish_before_a_long_one(tiny_pipe):
    engine = StepEngine(tiny_pipe, max_rows=4, scheduling="step")
    long = engine.submit(_resolved(GenerationRequest(prompt="long", seed=1, **{**SMALL, "num_inference_steps": 30})))
    for _ in range(2):
        engine.step()
    short = engine.submit(_resolved(GenerationRequest(prompt="short", seed=2, **{**SMALL, "num_inference_steps": 4})))
    steps = 0
    while not short.done:
        engine.step()
        steps += 1
    assert steps == 4 and not long.done and long.step == 6
    engine.run_until_idle()


def test_a_full_engine_admits_the_waiting_request_due_first(tiny_pipe):
    engine = StepEngine(tiny_pipe, max_rows=1, scheduling="step")
    running = engine.submit(_resolved(GenerationRequest(prompt="running", seed=1, **{**SMALL, "num_inference_steps": 3})))
    engine.step()
    long = engine.submit(_resolved(GenerationRequest(prompt="long", seed=2, **{**SMALL, "num_inference_steps": 12})))
    engine.step()
    short = engine.submit(_resolved(GenerationRequest(prompt="short", seed=3, **{**SMALL, "num_inference_steps": 2})))
    while not short.done:  # due at step 2 + 2, before the long one's 1 + 12: admitted first
        engine.step()
        assert long.step == 0
    assert running.done
    engine.run_until_idle()
    assert long.done


def test_a_waiting_request_is_not_overtaken_once_it_is_due_first(tiny_pipe):
    engine = StepEngine(tiny_pipe, max_rows=1, scheduling="step")
    engine.submit(_resolved(GenerationRequest(prompt="running", seed=1, **{**SMALL, "num_inference_steps": 6})))
    engine.step()
    long = engine.submit(_resolved(GenerationRequest(prompt="long", seed=2, **{**SMALL, "num_inference_steps": 4})))
    for _ in range(4):
        engine.step()
    late = engine.submit(_resolved(GenerationRequest(prompt="late", seed=3, **{**SMALL, "num_inference_steps": 2})))
    while not long.done:  # due 1 + 4 against the late one's 5 + 2: arrival order holds
        engine.step()
        assert late.step == 0
    engine.run_until_idle()


def test_request_scheduling_admits_only_into_an_empty_engine(tiny_pipe):
    engine = StepEngine(tiny_pipe, max_rows=4, scheduling="request")
    long = engine.submit(_resolved(GenerationRequest(prompt="long", seed=1, **{**SMALL, "num_inference_steps": 8})))
    engine.step()
    short = engine.submit(_resolved(GenerationRequest(prompt="short", seed=2, **{**SMALL, "num_inference_steps": 2})))
    while not long.done:
        engine.step()
        assert short.step == 0
    engine.run_until_idle()
    assert isinstance(short.outcome, RunOutput)
    assert engine.stats()["admitted_into_running"] == 0


def test_request_scheduling_waits_for_a_batch_to_form(tiny_pipe):
    engine = StepEngine(tiny_pipe, max_rows=3, scheduling="request", batch_wait_s=0.2)
    first = engine.submit(_resolved(GenerationRequest(prompt="a", seed=1, **SMALL)))
    engine.step()
    assert first.step == 0  # the window is open
    others = [engine.submit(_resolved(GenerationRequest(prompt=p, seed=2, **SMALL))) for p in "bc"]
    engine.step()  # full: admitted without waiting out the window
    assert first.step == 1 and all(control.step == 1 for control in others)
    engine.run_until_idle()


def test_at_most_max_rows_denoise_at_once(tiny_pipe):
    engine = StepEngine(tiny_pipe, max_rows=2)
    controls = [engine.submit(_resolved(GenerationRequest(prompt="p", seed=i, **SMALL))) for i in range(3)]
    engine.step()
    assert [control.step for control in controls] == [1, 1, 0]
    engine.run_until_idle()
    assert max(engine.stats()["rows_per_forward"]) == 2 and all(control.done for control in controls)


def test_a_full_queue_is_refused_with_503(tiny_pipe):
    engine = StepEngine(tiny_pipe, max_rows=1, max_waiting=2)
    for seed in range(2):
        engine.submit(_resolved(GenerationRequest(prompt="p", seed=seed, **SMALL)))
    with pytest.raises(OverloadedError) as info:
        engine.submit(_resolved(GenerationRequest(prompt="p", seed=3, **SMALL)))
    assert info.value.status_code == 503 and info.value.code == "overloaded"
    engine.run_until_idle()


def test_a_failing_forward_fails_only_its_rows(tiny_dir):
    from deployments.pipelines import load_pipeline

    def fail_on_wide_latents(module, args):
        if args[0].shape[-1] == 12:  # 96 pixels
            raise RuntimeError("boom")

    pipe = load_pipeline(SPEC)  # its own, so the hook stays there
    pipe.unet.register_forward_pre_hook(fail_on_wide_latents)
    engine = StepEngine(pipe, max_rows=4)
    wide, square = _run(engine, [
        GenerationRequest(prompt="wide", seed=1, **{**SMALL, "width": 96}),
        GenerationRequest(prompt="square", seed=2, **SMALL),
    ])
    assert isinstance(wide, EngineError) and wide.status_code == 500
    assert isinstance(square, RunOutput)
    assert engine.stats()["failed"] == 1


# --- compiled batch shapes --------------------------------------------------------------------


def test_buckets_pad_forwards_without_changing_images(tiny_pipe, engine):
    bucketed = StepEngine(tiny_pipe, max_rows=8, buckets=[2, 4])
    requests = [GenerationRequest(prompt=f"p{i}", seed=i, **SMALL) for i in range(3)]
    outcomes = _run(bucketed, requests)
    stats = bucketed.stats()
    # three guided images are 6 UNet rows: with buckets of 4 and 8 rows, one call padded to 8
    assert stats["unet_calls"] == 3 and stats["padded_unet_rows"] == 3 * 2
    for request, outcome in zip(requests, outcomes):
        assert np.abs(outcome.image - _alone(engine, request)).max() <= FIDELITY_ATOL


def _progress_log() -> tuple[list, Callable[[str], RequestControl]]:
    steps: list[tuple[str, int]] = []
    return steps, lambda name: RequestControl(on_progress=lambda step, total: steps.append((name, step)))


def test_when_the_plan_is_several_calls_the_rows_due_first_take_the_step(tiny_pipe, engine):
    # Buckets of 1 and 8 images at their unmeasured costs (2 and 16): two guided images are
    # cheapest as two calls of 2 rows, so one call runs a step, holding the row due first.
    bucketed = StepEngine(tiny_pipe, max_rows=8, buckets=[1, 8])
    long = GenerationRequest(prompt="long", seed=1, **{**SMALL, "num_inference_steps": 5})
    short = GenerationRequest(prompt="short", seed=2, **{**SMALL, "num_inference_steps": 2})
    steps, control = _progress_log()
    long_control = bucketed.submit(_resolved(long), control("long"))  # admitted first, but due at step 5
    short_control = bucketed.submit(_resolved(short), control("short"))  # due at step 2
    bucketed.step()
    bucketed.step()
    assert short_control.done and steps == [("short", 1), ("short", 2)]
    bucketed.run_until_idle()
    assert steps[2:] == [("long", step) for step in range(1, 6)]
    assert bucketed.stats()["deferred_row_steps"] == 2 and bucketed.stats()["unet_calls"] == 7
    for request, request_control in ((long, long_control), (short, short_control)):  # waiting changes no image
        assert np.abs(request_control.outcome.image - _alone(engine, request)).max() <= FIDELITY_ATOL


def test_when_one_padded_call_is_cheapest_every_row_takes_every_step(tiny_pipe):
    bucketed = StepEngine(tiny_pipe, max_rows=8, buckets=[1, 8])
    bucketed.forward_calls.costs = {2: 1.0, 16: 1.5}  # batching nearly free: pad two images to 8
    steps, control = _progress_log()
    for name, count in (("long", 3), ("short", 2)):
        bucketed.submit(_resolved(GenerationRequest(prompt=name, seed=1, **{**SMALL, "num_inference_steps": count})), control(name))
    bucketed.run_until_idle()
    assert steps == [("long", 1), ("short", 1), ("long", 2), ("short", 2), ("long", 3)]
    assert bucketed.stats()["deferred_row_steps"] == 0


def test_a_guided_row_steps_when_one_row_calls_are_cheapest(tiny_pipe, engine):
    """With the one-row bucket (`unguided_bucket`) timed at under half a call of two, a lone
    guided row's cheapest plan is two calls of one row, neither of which holds the whole row: it
    takes every step as those two calls (before, no row took the step and the engine looped on
    empty forwards), and its image is unchanged."""
    bucketed = StepEngine(tiny_pipe, max_rows=8, buckets=[1, 2], unguided_bucket=True)
    bucketed.forward_calls.costs = {1: 1.0, 2: 3.0, 4: 6.0}
    request = GenerationRequest(prompt="guided", seed=4, **SMALL)
    control = bucketed.submit(_resolved(request))
    for _ in range(SMALL["num_inference_steps"]):
        bucketed.step()
    assert control.done and isinstance(control.outcome, RunOutput), control.outcome
    stats = bucketed.stats()
    assert (stats["forwards"], stats["unet_calls"], stats["padded_unet_rows"]) == (3, 6, 0)
    assert np.abs(control.outcome.image - _alone(engine, request)).max() <= FIDELITY_ATOL


@pytest.mark.parametrize(
    "count, costs, sizes",
    [
        (10, {2: 1.0, 16: 8.0}, [2, 2, 2, 2, 2]),  # five images: padding 10 rows to 16 wastes three
        (10, {2: 1.0, 16: 2.0}, [10]),  # a call of 16 costs two of 2: pad
        (16, {2: 1.154, 16: 8.1}, [16]),  # H100, 1024², 30 steps (BENCHMARKS.md)
        (34, {2: 1.0, 16: 8.0}, [16, 16, 2]),  # more than the largest bucket
        (3, {2: 2.0, 4: 4.0}, [3]),  # 2 + 1 (padded to 2 + 2) ties with 3 (padded to 4): fewer calls
        (6, {1: 0.3, 2: 0.35, 4: 0.5, 8: 0.9}, [4, 2]),
    ],
)
def test_plan_calls_takes_the_cheapest_split(count, costs, sizes):
    assert plan_calls(count, costs) == sizes
    assert sum(sizes) == count


def test_a_warm_up_request_that_fails_fails_the_start(tiny_pipe, monkeypatch):
    # A UNet that cannot run the 2-image bucket (as a compiled graph past its recompile limit or
    # out of memory would): the replica must not start and report healthy.
    forward = tiny_pipe.unet.forward

    def failing_at_four_rows(sample, *args, **kwargs):
        if sample.shape[0] == 4:
            raise RuntimeError("no graph for 4 rows")
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(tiny_pipe.unet, "forward", failing_at_four_rows)
    engine = StepEngine(tiny_pipe, max_rows=4, buckets=[1, 2])
    with pytest.raises(RuntimeError, match=r"warm-up failed running 2 image\(s\) of 64x64"):
        engine.warmup(_resolved(GenerationRequest(prompt="w", seed=0, **{**SMALL, "num_inference_steps": 2})))


def test_warmup_compiles_every_bucket_then_times_each(tiny_pipe):
    engine = StepEngine(tiny_pipe, max_rows=4, buckets=[1, 2])
    assert engine.forward_calls.costs == {2: 2.0, 4: 4.0}  # until measured: the padded size
    engine.warmup(_resolved(GenerationRequest(prompt="w", seed=0, **{**SMALL, "num_inference_steps": 2})))
    assert set(engine.forward_calls.costs) == {2, 4} and set(engine.decode_calls.costs) == {1, 2}
    assert all(0 < seconds < 60 for seconds in engine.forward_calls.costs.values())
    assert engine.forward_calls.costs != {2: 2.0, 4: 4.0}
    # Each cost is the least of at least two timing rounds (how they settled is kept).
    for size, rounds in engine.forward_calls.timing_rounds.items():
        assert len(rounds) >= 2 and engine.forward_calls.costs[size] == pytest.approx(min(rounds), abs=1e-4)
    assert engine.stats()["admitted"] == 0  # the warm-up's requests are not counted


@pytest.mark.parametrize(
    "values, rounds",
    [
        # The H200's pattern: the first rounds after a compiled warm-up slow, then steady.
        ([0.65, 0.47, 0.30, 0.28, 0.5], [0.65, 0.47, 0.30, 0.28]),
        ([0.28, 0.29, 0.9], [0.28, 0.29]),  # settled at once: two rounds
        ([1.0, 2.0] * 5, [1.0, 2.0, 1.0, 2.0, 1.0, 2.0]),  # never settles: capped
    ],
)
def test_warm_up_timing_goes_on_until_two_rounds_agree(values, rounds):
    """`settled_rounds` times until two rounds in a row agree within 10%; the planner prices a
    bucket at the least round (`CallPlanner.timed`): a replica priced its 16-row call from the
    first, slow round at 0.67 s (0.28 s steady) and split its groups into 2-row calls."""
    taken = iter(values)
    assert settled_rounds(lambda: next(taken)) == rounds
    planner = CallPlanner([2, 16])
    planner.timed(16, rounds)
    assert planner.costs == {2: 2.0, 16: min(rounds)} and planner.timing_rounds == {16: rounds}


def test_a_bucket_is_priced_by_the_median_of_its_last_served_calls():
    """The warm-up's price stands until `SERVED_MIN` served calls ran; then the median of the last
    `SERVED_WINDOW` (a burst moves it by one place, a lasting change replaces it)."""
    planner = CallPlanner([2, 16])
    planner.timed(16, [0.38, 0.381])  # an H200 replica's warm-up (then served at 0.285 s)
    for seconds in (0.29, 0.28):
        planner.observed(16, seconds)
    assert planner.costs == {2: 2.0, 16: 0.38}
    planner.observed(16, 0.9)
    assert planner.costs[16] == 0.29
    for _ in range(SERVED_WINDOW):
        planner.observed(16, 0.5)
    assert planner.costs == {2: 2.0, 16: 0.5} and planner.served_calls == {16: 3 + SERVED_WINDOW}


def test_a_bucket_on_trial_is_planned_as_if_batching_were_free():
    """A bucket the warm-up priced too high would never run, and so never be re-priced: until
    `SERVED_MIN` served calls price it, a group needing several calls of the bucket below runs as
    one call of it; then its served price plans."""
    planner = CallPlanner([2, 16])
    planner.timed(2, [0.072, 0.072])
    planner.timed(16, [0.60, 0.60])  # the H200 replica's warm-up; the call runs at ~0.28 s
    assert planner.on_trial(16) and planner.split(10) == [10] and planner.split(2) == [2]
    for _ in range(SERVED_MIN):
        planner.observed(16, 0.60)  # it was that slow after all
    assert not planner.on_trial(16) and planner.split(10) == [2, 2, 2, 2, 2]
    untimed = CallPlanner([2, 16])  # prices set by hand (tests) or untimed are never on trial
    untimed.costs = {2: 0.072, 16: 0.60}
    assert not untimed.on_trial(16) and untimed.split(10) == [2, 2, 2, 2, 2]


def test_served_calls_reprice_their_bucket_after_the_warm_up(tiny_pipe):
    """From the end of the warm-up's timing on, the UNet calls served price their bucket; the
    warm-up's own calls (which compile, on a GPU) price nothing."""
    engine = StepEngine(tiny_pipe, max_rows=4, buckets=[1, 2])
    engine.warmup(_resolved(GenerationRequest(prompt="w", seed=0, **{**SMALL, "num_inference_steps": 2})))
    assert engine.stats()["unet_calls_priced"] == {}
    four_rows = engine.forward_calls.costs[4]
    engine.forward_calls.costs[2] = 50.0  # as if the warm-up had caught one image's call slow
    engine.generate([_resolved(GenerationRequest(prompt="served", seed=1, **{**SMALL, "num_inference_steps": 4}))])
    stats = engine.stats()
    assert stats["unet_calls_priced"] == {2: 4}
    assert 0 < stats["unet_call_s"][2] < 1.0 and stats["unet_call_s"][4] == round(four_rows, 4)


def test_stats_count_the_processs_garbage_collections(tiny_pipe):
    """`stats()["gc"]`: every thread stops while the cyclic collector runs, so a replica's
    collections and their seconds are counted (process-wide, from `gc.callbacks`)."""
    before = StepEngine(tiny_pipe, max_rows=2).stats()["gc"]
    gc.collect()
    after = StepEngine(tiny_pipe, max_rows=2).stats()["gc"]
    assert after["collections"] == before["collections"] + 1
    assert after["full_collections"] == before["full_collections"] + 1
    assert after["full_seconds"] > before["full_seconds"] and after["longest_s"] > 0
    assert gc.callbacks.count(GcPauses.installed()._on_collection) == 1  # one recorder, however many engines


def test_the_cuda_allocator_counts_read_torchs_names():
    """`stats()["cuda_allocator"]` on a GPU engine (this machine has none): the driver calls and
    retries `torch.cuda.memory_stats` reports, zero where a torch build lacks a counter."""
    memory = {"num_device_alloc": 12, "num_device_free": 3, "num_alloc_retries": 1, "allocated_bytes.all.peak": 9}
    assert cuda_allocator_counts(memory) == {"device_allocs": 12, "device_frees": 3, "alloc_retries": 1}
    assert cuda_allocator_counts({}) == {"device_allocs": 0, "device_frees": 0, "alloc_retries": 0}
