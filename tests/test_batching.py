"""The batch runner on the tiny model (fp32 CPU, no Ray): fidelity, fusion, cancel, deadline."""

import threading
import time

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from configs.schedulers import SCHEDULERS
from deployments.batching import (
    BatchRunner,
    RequestControl,
    RunOutput,
    compatibility_key,
    group_by_key,
    plan_calls,
)
from deployments.pipelines import make_scheduler
from deployments.types import DeadlineExceededError, GenerationRequest, RequestCancelledError

FIDELITY_ATOL = 1e-4
SMALL = dict(width=64, height=64, num_inference_steps=3, guidance_scale=5.0, scheduler="euler")


@pytest.fixture(scope="module")
def reference_pipe(tiny_dir):
    """A plain diffusers pipeline loaded independently from the same folder: the ground truth."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = pipe.scheduler.config  # each test swaps the scheduler
    return pipe


@pytest.fixture(scope="module")
def runner(tiny_pipe):
    reports = []
    runner = BatchRunner(tiny_pipe, on_group=reports.append)
    runner.reports = reports
    return runner


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


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_each_scheduler_matches_plain_diffusers(runner, reference_pipe, scheduler):
    request = GenerationRequest(prompt="a red circle", negative_prompt="blurry", seed=7, **{**SMALL, "scheduler": scheduler})
    (ours,) = runner.run([request])
    expected = _reference_image(reference_pipe, request)
    assert isinstance(ours, RunOutput)
    assert ours.image.shape == (64, 64, 3)
    assert np.abs(ours.image - expected).max() <= FIDELITY_ATOL


def test_schedulers_differ(runner):
    """Each scheduler id really switches the sampler (same seed, different images)."""
    images = {
        name: runner.run([GenerationRequest(prompt="a dog", seed=1, **{**SMALL, "scheduler": name})])[0].image
        for name in ("euler", "ddim", "dpmpp_2m_karras")
    }
    assert np.abs(images["euler"] - images["ddim"]).max() > 1e-3
    assert np.abs(images["euler"] - images["dpmpp_2m_karras"]).max() > 1e-3


def test_missing_negative_prompt_matches_plain_pipeline_default(runner, reference_pipe):
    """No negative prompt = diffusers' `negative_prompt=None` (zeroed embeddings), not ''."""
    none_request = GenerationRequest(prompt="a blue square", seed=3, **SMALL)
    empty_request = none_request.model_copy(update={"negative_prompt": ""})
    none_image, empty_image = (o.image for o in runner.run([none_request, empty_request]))
    assert np.abs(none_image - _reference_image(reference_pipe, none_request)).max() <= FIDELITY_ATOL
    assert np.abs(empty_image - _reference_image(reference_pipe, empty_request)).max() <= FIDELITY_ATOL
    assert np.abs(none_image - empty_image).max() > 1e-3


def _mixed_requests() -> list[GenerationRequest]:
    prompts = ["a red circle", "a green star", "a cat", "a house", "rain", "a blue square", "a tree", "night"]
    return [
        GenerationRequest(
            prompt=prompt,
            negative_prompt=None if i % 3 == 0 else f"ugly {i}",
            seed=100 + i,
            **{**SMALL, "scheduler": "euler_a" if i % 2 else "dpmpp_2m"},
        )
        for i, prompt in enumerate(prompts)
    ]


def test_fused_batch_equals_requests_run_one_by_one(runner):
    requests = _mixed_requests()
    runner.reports.clear()
    fused = runner.run(requests)
    assert [r.size for r in runner.reports] == [4, 4]  # two compatible groups, one call each
    for request, outcome in zip(requests, fused):
        (alone,) = runner.run([request])
        assert outcome.batch_size == 4 and alone.batch_size == 1
        assert outcome.seed == request.seed
        assert np.abs(outcome.image - alone.image).max() <= FIDELITY_ATOL


def test_image_does_not_depend_on_batch_position(runner):
    requests = _mixed_requests()[:4:2]  # same key, two requests
    forward = runner.run(requests)
    backward = runner.run(requests[::-1])
    assert np.abs(forward[0].image - backward[1].image).max() <= FIDELITY_ATOL


def test_grouping_key_splits_incompatible_requests():
    base = GenerationRequest(prompt="x", seed=1, **SMALL)
    variants = [
        base,
        base.model_copy(update={"prompt": "y", "seed": 2, "negative_prompt": "z"}),  # same group
        base.model_copy(update={"width": 128}),
        base.model_copy(update={"num_inference_steps": 4}),
        base.model_copy(update={"scheduler": "ddim"}),
        base.model_copy(update={"guidance_scale": 1.0}),
    ]
    assert compatibility_key(variants[0]) == compatibility_key(variants[1])
    assert group_by_key(variants) == [[0, 1], [2], [3], [4], [5]]


def test_unresolved_request_is_refused(runner):
    with pytest.raises(ValueError, match="with_defaults"):
        runner.run([GenerationRequest(prompt="p")])


def test_seed_is_drawn_and_reproducible(runner):
    request = GenerationRequest(prompt="a boat", **SMALL)
    (first,) = runner.run([request])
    (again,) = runner.run([request.model_copy(update={"seed": first.seed})])
    assert 0 <= first.seed < 2**32
    assert np.abs(first.image - again.image).max() <= FIDELITY_ATOL


def test_no_guidance_runs_without_negative_branch(runner, reference_pipe):
    request = GenerationRequest(prompt="a lake", seed=5, **{**SMALL, "guidance_scale": 1.0})
    (ours,) = runner.run([request])
    assert np.abs(ours.image - _reference_image(reference_pipe, request)).max() <= FIDELITY_ATOL


def test_progress_is_reported_per_step(runner):
    seen = []
    control = RequestControl(on_progress=lambda step, total: seen.append((step, total)))
    runner.run([GenerationRequest(prompt="p", seed=1, **SMALL)], [control])
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_cancelled_before_running_never_runs(runner):
    runner.reports.clear()
    control = RequestControl()
    control.cancel()
    (outcome,) = runner.run([GenerationRequest(prompt="p", seed=1, **SMALL)], [control])
    assert isinstance(outcome, RequestCancelledError) and outcome.status_code == 409
    assert runner.reports == []


def test_expired_deadline_never_runs(runner):
    runner.reports.clear()
    control = RequestControl(deadline=time.time() - 1)
    (outcome,) = runner.run([GenerationRequest(prompt="p", seed=1, **SMALL)], [control])
    assert isinstance(outcome, DeadlineExceededError) and outcome.status_code == 504
    assert runner.reports == []


def test_cancel_mid_run_leaves_batch_neighbour_unchanged(runner):
    """Cancelling one request of a fused group answers it 'cancelled'; the other's image is the
    image it gets alone."""
    keep = GenerationRequest(prompt="keep me", seed=11, **{**SMALL, "num_inference_steps": 6})
    drop = keep.model_copy(update={"prompt": "drop me", "seed": 12, "request_id": "drop"})
    drop_control = RequestControl(on_progress=lambda step, total: drop_control.cancel() if step == 2 else None)
    kept, dropped = runner.run([keep, drop], [RequestControl(), drop_control])
    (alone,) = runner.run([keep])
    assert isinstance(dropped, RequestCancelledError)
    assert kept.batch_size == 2
    assert np.abs(kept.image - alone.image).max() <= FIDELITY_ATOL


def test_cancelling_every_request_stops_the_denoising_loop(runner):
    runner.reports.clear()
    control = RequestControl(on_progress=lambda step, total: control.cancel() if step == 2 else None)
    (outcome,) = runner.run([GenerationRequest(prompt="p", seed=1, **{**SMALL, "num_inference_steps": 20})], [control])
    assert isinstance(outcome, RequestCancelledError)
    (report,) = runner.reports
    assert report.interrupted and report.steps_run == 2 and report.total_steps == 20


def test_cancel_from_another_thread(runner):
    started = threading.Event()
    control = RequestControl(on_progress=lambda step, total: started.set())
    threading.Thread(target=lambda: started.wait(10) and control.cancel()).start()
    (outcome,) = runner.run([GenerationRequest(prompt="p", seed=1, **{**SMALL, "num_inference_steps": 200})], [control])
    assert isinstance(outcome, RequestCancelledError)
    assert control.step < 200


def test_deadline_passing_mid_run_answers_504(runner):
    control = RequestControl(
        on_progress=lambda step, total: setattr(control, "deadline", time.time() - 1) if step == 1 else None
    )
    (outcome,) = runner.run([GenerationRequest(prompt="p", seed=1, **{**SMALL, "num_inference_steps": 10})], [control])
    assert isinstance(outcome, DeadlineExceededError)
    assert control.step == 1


# --- img2img and inpainting -------------------------------------------------------------------


def _picture(seed: int, size=(64, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)


def _square_mask(size=(64, 64)) -> np.ndarray:
    mask = np.zeros((size[1], size[0]), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return mask


EDIT = dict(num_inference_steps=4, guidance_scale=5.0, scheduler="euler_a", width=64, height=64)


@pytest.fixture(scope="module")
def img2img_reference(reference_pipe):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(reference_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inpaint_reference(reference_pipe):
    from diffusers import StableDiffusionXLInpaintPipeline

    pipe = StableDiffusionXLInpaintPipeline.from_pipe(reference_pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _edit_reference(pipe, request: GenerationRequest, **extra) -> np.ndarray:
    from PIL import Image

    pipe.scheduler = make_scheduler(request.scheduler, pipe.original_scheduler_config)
    return pipe(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        image=Image.fromarray(request.init_image),
        strength=request.strength,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        **extra,
    ).images[0]


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m_karras", "ddim"])
def test_img2img_matches_plain_diffusers(runner, img2img_reference, reference_pipe, scheduler):
    img2img_reference.original_scheduler_config = reference_pipe.original_scheduler_config
    request = GenerationRequest(
        prompt="a red circle", negative_prompt="blur", kind="img2img", init_image=_picture(1), strength=0.6, seed=4,
        **{**EDIT, "scheduler": scheduler},
    )
    (ours,) = runner.run([request])
    expected = _edit_reference(img2img_reference, request, output_type="np")
    assert np.abs(ours.image - expected).max() <= FIDELITY_ATOL


@pytest.mark.parametrize("mask_blur", [0, 6])
def test_inpaint_matches_plain_diffusers(runner, inpaint_reference, reference_pipe, mask_blur):
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    inpaint_reference.original_scheduler_config = reference_pipe.original_scheduler_config
    request = GenerationRequest(
        prompt="a blue square", kind="inpaint", init_image=_picture(2), mask_image=_square_mask(),
        strength=0.8, mask_blur=mask_blur, seed=9, **EDIT,
    )
    (ours,) = runner.run([request])
    mask = Image.fromarray(request.mask_image)
    mask = VaeImageProcessor.blur(mask, blur_factor=mask_blur) if mask_blur else mask
    expected = _edit_reference(inpaint_reference, request, mask_image=mask, height=64, width=64, output_type="np")
    assert np.abs(ours.image - expected).max() <= FIDELITY_ATOL


def test_inpaint_full_resolution_crop_matches_plain_diffusers(runner, inpaint_reference, reference_pipe):
    from PIL import Image

    inpaint_reference.original_scheduler_config = reference_pipe.original_scheduler_config
    request = GenerationRequest(
        prompt="a star", kind="inpaint", init_image=_picture(3), mask_image=_square_mask(),
        strength=0.9, padding_mask_crop=4, seed=5, **EDIT,
    )
    (ours,) = runner.run([request])
    expected = _edit_reference(
        inpaint_reference, request, mask_image=Image.fromarray(request.mask_image), padding_mask_crop=4,
        height=64, width=64, output_type="pil",
    )
    assert np.abs(ours.image - np.asarray(expected, dtype=np.float32) / 255.0).max() <= FIDELITY_ATOL
    outside = request.mask_image == 0  # the paste-back keeps the unmasked pixels exactly
    assert np.array_equal((ours.image[outside] * 255).round().astype(np.uint8), request.init_image[outside])


def _edit_requests() -> list[GenerationRequest]:
    requests = []
    for i in range(3):
        requests.append(GenerationRequest(prompt=f"img {i}", kind="img2img", init_image=_picture(10 + i), strength=0.7, seed=20 + i, **EDIT))
        requests.append(
            GenerationRequest(
                prompt=f"fill {i}", negative_prompt=None if i else "dark", kind="inpaint", init_image=_picture(30 + i),
                mask_image=_square_mask(), mask_blur=2 * i, strength=0.9, seed=40 + i, **EDIT,
            )
        )
        requests.append(GenerationRequest(prompt=f"txt {i}", seed=50 + i, **EDIT))
    return requests


def test_edit_kinds_fuse_per_kind_and_equal_one_by_one(runner):
    requests = _edit_requests()
    runner.reports.clear()
    fused = runner.run(requests)
    assert sorted((r.key[0], r.size) for r in runner.reports) == [("img2img", 3), ("inpaint", 3), ("txt2img", 3)]
    for request, outcome in zip(requests, fused):
        (alone,) = runner.run([request])
        assert outcome.batch_size == 3
        assert np.abs(outcome.image - alone.image).max() <= FIDELITY_ATOL


def test_kinds_never_share_a_key():
    txt, img, inp = (_edit_requests()[i] for i in (2, 0, 1))
    keys = {compatibility_key(r) for r in (txt, img, inp)}
    assert len(keys) == 3
    assert compatibility_key(img) != compatibility_key(img.model_copy(update={"strength": 0.5}))


def test_crop_requests_never_fuse():
    base = GenerationRequest(
        prompt="p", kind="inpaint", init_image=_picture(1), mask_image=_square_mask(), strength=0.9,
        padding_mask_crop=8, seed=1, **EDIT,
    )
    other = base.model_copy(update={"request_id": "other"})
    assert group_by_key([base, other]) == [[0], [1]]


def test_all_kinds_share_one_set_of_weights(runner, tiny_pipe):
    """txt2img, img2img and inpaint pipelines hold the very same modules and tensors."""
    base = GenerationRequest(prompt="p", seed=1, **EDIT)
    pipes = [
        runner._pipeline_for(base),
        runner._pipeline_for(_edit_requests()[0]),
        runner._pipeline_for(_edit_requests()[1]),
    ]
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(tiny_pipe, part)
        for pipe in pipes:
            assert getattr(pipe, part) is module
            first = next(getattr(pipe, part).parameters())
            assert first.data_ptr() == next(module.parameters()).data_ptr()
    assert [type(p).__name__ for p in pipes] == [
        "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
    ]


def test_strength_scales_the_steps_run(runner):
    seen = []
    control = RequestControl(on_progress=lambda step, total: seen.append(total))
    request = GenerationRequest(prompt="p", kind="img2img", init_image=_picture(1), strength=0.5, seed=1, **{**EDIT, "num_inference_steps": 10})
    runner.run([request], [control])
    assert seen and seen[-1] == 5


# --- batch-shape buckets ----------------------------------------------------------------------


def test_buckets_pad_groups_without_changing_images(tiny_pipe):
    reports = []
    # No bucket of 1: seven requests go as 4 + 3 (padded to 4), which costs no more than 4 + 2 + 1.
    bucketed = BatchRunner(tiny_pipe, on_group=reports.append, buckets=[2, 4])
    requests = [GenerationRequest(prompt=f"p{i}", seed=i, **SMALL) for i in range(7)]
    outcomes = bucketed.run(requests)
    assert [(r.size, r.padded_size) for r in reports] == [(4, 4), (3, 4)]
    plain = BatchRunner(tiny_pipe)
    for request, outcome in zip(requests, outcomes):
        (alone,) = plain.run([request])
        assert outcome.batch_size in (3, 4)
        assert np.abs(outcome.image - alone.image).max() <= FIDELITY_ATOL


def test_buckets_split_a_group_rather_than_pad_it_when_that_costs_less(tiny_pipe):
    reports = []
    runner = BatchRunner(tiny_pipe, on_group=reports.append, buckets=[1, 2, 4])
    runner.run([GenerationRequest(prompt=f"p{i}", seed=i, **SMALL) for i in range(7)])
    assert [(r.size, r.padded_size) for r in reports] == [(4, 4), (2, 2), (1, 1)]


@pytest.mark.parametrize(
    "count, costs, sizes",
    [
        (5, {1: 1.0, 8: 8.0}, [1, 1, 1, 1, 1]),  # padding 5 to 8 wastes three images
        (5, {1: 1.0, 8: 2.0}, [5]),  # a batch of 8 costs two singles: pad
        (8, {1: 1.154, 8: 8.1}, [8]),  # H100, 1024², 30 steps (BENCHMARKS.md)
        (17, {1: 1.0, 8: 8.0}, [8, 8, 1]),  # more than the largest bucket
        (3, {2: 2.0, 4: 4.0}, [3]),  # 2 + 1 (padded to 2 + 2) ties with 3 (padded to 4): fewer calls
        (6, {1: 0.3, 2: 0.35, 4: 0.5, 8: 0.9}, [4, 2]),
    ],
)
def test_plan_calls_takes_the_cheapest_split(count, costs, sizes):
    assert plan_calls(count, costs) == sizes
    assert sum(sizes) == count


def test_warmup_runs_every_bucket_then_times_each(tiny_pipe):
    reports = []
    runner = BatchRunner(tiny_pipe, on_group=reports.append, buckets=[1, 2])
    assert runner.bucket_costs == {1: 1.0, 2: 2.0}  # until measured: the padded size
    runner.warmup([GenerationRequest(prompt="w", seed=0, **SMALL)])
    assert [r.padded_size for r in reports] == [1, 2, 1, 2]
    assert set(runner.bucket_costs) == {1, 2}
    assert all(0 < seconds < 60 for seconds in runner.bucket_costs.values())
    assert runner.bucket_costs != {1: 1.0, 2: 2.0}
