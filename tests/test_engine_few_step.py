"""Few-step generation on the step engine (tiny model, fp32 CPU, no Ray): the `lcm` and `tcd`
schedulers and `timestep_spacing` equal plain diffusers with the scheduler swapped as its docs
swap it (`LCMScheduler.from_config(pipe.scheduler.config)`, `EulerDiscreteScheduler.from_config(...,
timestep_spacing="trailing")`), same seed and generator, in txt2img, img2img, inpainting and a
hires second pass; an `lcm` row shares forwards with an `euler` row without changing either."""

import numpy as np
import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    TCDScheduler,
)
from PIL import Image

from configs.model_spec import TinySpec
from deployments.engine.control import RequestControl, RunOutput
from deployments.engine.loop import StepEngine
from deployments.engine.rows import RowFactory
from deployments.types import GenerationRequest, HiresSettings

FIDELITY_ATOL = 1e-4
SPEC = TinySpec(device="cpu")
SIZE = dict(width=64, height=64)

#: request settings -> the scheduler a diffusers user would swap in for them.
SWAPS = {
    "lcm": (dict(scheduler="lcm"), lambda config: LCMScheduler.from_config(config)),
    "tcd": (dict(scheduler="tcd"), lambda config: TCDScheduler.from_config(config)),
    "euler trailing": (
        dict(scheduler="euler", timestep_spacing="trailing"),
        lambda config: EulerDiscreteScheduler.from_config(config, timestep_spacing="trailing"),
    ),
}


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Plain diffusers over components loaded independently of the engine's: the ground truth.
    Each test swaps in a fresh scheduler made from `config`, the model's own."""
    txt2img = StableDiffusionXLPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipes = {
        "txt2img": txt2img,
        "img2img": StableDiffusionXLImg2ImgPipeline.from_pipe(txt2img),
        "inpaint": StableDiffusionXLInpaintPipeline.from_pipe(txt2img),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes, txt2img.scheduler.config


@pytest.fixture(scope="module")
def engine(tiny_pipe):
    return StepEngine(tiny_pipe, max_rows=8)


def _one(engine: StepEngine, request: GenerationRequest) -> RunOutput:
    (outcome,) = engine.generate([request.with_defaults(SPEC)])
    assert isinstance(outcome, RunOutput), outcome
    return outcome


def _picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)


def _common(request: GenerationRequest) -> dict:
    """What every diffusers call below takes from the request; no `eta`: the pipelines' default."""
    return dict(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="np",
    )


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("guidance_scale", [1.0, 1.5])
@pytest.mark.parametrize("swap", sorted(SWAPS))
def test_txt2img_matches_diffusers_with_the_scheduler_swapped(engine, reference, swap, guidance_scale, steps):
    settings, make = SWAPS[swap]
    pipes, config = reference
    request = GenerationRequest(
        prompt="a large red star on a blue background", negative_prompt="blurry", seed=11,
        num_inference_steps=steps, guidance_scale=guidance_scale, **SIZE, **settings,
    )
    ours = _one(engine, request).image
    pipes["txt2img"].scheduler = make(config)
    theirs = pipes["txt2img"](width=64, height=64, **_common(request)).images[0]
    assert ours.shape == theirs.shape == (64, 64, 3)
    assert np.abs(ours - theirs).max() <= FIDELITY_ATOL


def test_trailing_spacing_changes_the_schedule_and_the_image(engine, tiny_pipe):
    """The override reaches the row's scheduler: trailing starts at the last training timestep
    (the tiny model's own config is leading, with steps_offset 1), and the image differs."""
    base = GenerationRequest(prompt="a blue circle", seed=4, num_inference_steps=4, guidance_scale=1.0, scheduler="euler", **SIZE)
    trailing = base.model_copy(update={"timestep_spacing": "trailing"})
    factory = RowFactory(tiny_pipe)
    schedules = {}
    for request in (base, trailing):
        resolved = request.with_defaults(SPEC)
        (embeds,) = factory.encode([resolved])
        schedules[request.timestep_spacing] = factory.prepare(resolved, RequestControl(), embeds, 0.0).timesteps.tolist()
    assert schedules["trailing"] == [999.0, 749.0, 499.0, 249.0]
    assert schedules[None] == [751.0, 501.0, 251.0, 1.0]
    assert np.abs(_one(engine, base).image - _one(engine, trailing).image).max() > 1e-2


@pytest.mark.parametrize(("steps", "strength"), [(4, 0.5), (8, 0.6)])
def test_img2img_with_lcm_matches_diffusers(engine, reference, steps, strength):
    """diffusers' SDXL img2img sets the full LCM schedule and takes its tail (it does not pass
    `strength` to `LCMScheduler.set_timesteps`, which would shorten the distillation schedule
    instead): the engine's img2img schedule is that one."""
    pipes, config = reference
    request = GenerationRequest(
        prompt="a green square", seed=5, kind="img2img", init_image=_picture(1), strength=strength,
        num_inference_steps=steps, guidance_scale=1.5, scheduler="lcm",
    )
    ours = _one(engine, request).image
    pipes["img2img"].scheduler = LCMScheduler.from_config(config)
    theirs = pipes["img2img"](image=Image.fromarray(request.init_image), strength=strength, **_common(request)).images[0]
    assert np.abs(ours - theirs).max() <= FIDELITY_ATOL


@pytest.mark.parametrize("scheduler, make", [("lcm", LCMScheduler.from_config), ("tcd", TCDScheduler.from_config)])
def test_inpainting_with_distilled_schedulers_matches_diffusers(engine, reference, scheduler, make):
    pipes, config = reference
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    request = GenerationRequest(
        prompt="a yellow triangle", seed=8, kind="inpaint", init_image=_picture(2), mask_image=mask,
        strength=0.75, num_inference_steps=8, guidance_scale=1.0, scheduler=scheduler,
    )
    ours = _one(engine, request).image
    pipes["inpaint"].scheduler = make(config)
    theirs = pipes["inpaint"](
        image=Image.fromarray(request.init_image), mask_image=Image.fromarray(mask), strength=0.75,
        width=64, height=64, **_common(request),
    ).images[0]
    assert np.abs(ours - theirs).max() <= FIDELITY_ATOL


def test_hires_pass_with_lcm_matches_txt2img_then_img2img_in_diffusers(engine, reference):
    """The second pass is img2img with the request's scheduler and spacing, continuing the first
    pass's generator: diffusers' txt2img then img2img with LCM and one generator."""
    pipes, config = reference
    request = GenerationRequest(
        prompt="a red star", seed=9, num_inference_steps=4, guidance_scale=1.0, scheduler="lcm",
        hires=HiresSettings(scale=1.5, strength=0.5, steps=6), **SIZE,
    )
    ours = _one(engine, request).image
    generator = torch.Generator("cpu").manual_seed(9)
    common = dict(prompt=request.prompt, guidance_scale=1.0, generator=generator)
    pipes["txt2img"].scheduler = LCMScheduler.from_config(config)
    first = pipes["txt2img"](width=64, height=64, num_inference_steps=4, output_type="pil", **common).images[0]
    pipes["img2img"].scheduler = LCMScheduler.from_config(config)
    theirs = pipes["img2img"](
        image=first.resize((96, 96), Image.LANCZOS), strength=0.5, num_inference_steps=6, output_type="np", **common
    ).images[0]
    assert ours.shape == theirs.shape == (96, 96, 3)
    assert np.abs(ours - theirs).max() <= FIDELITY_ATOL


def test_an_lcm_row_sharing_forwards_with_an_euler_row_equals_each_alone(engine):
    lcm = GenerationRequest(prompt="a red circle", seed=21, num_inference_steps=4, guidance_scale=1.5, scheduler="lcm", **SIZE)
    euler = GenerationRequest(
        prompt="a blue square", seed=22, num_inference_steps=6, guidance_scale=5.0, scheduler="euler",
        timestep_spacing="trailing", **SIZE,
    )
    alone = [_one(engine, request).image for request in (lcm, euler)]
    together = engine.generate([request.with_defaults(SPEC) for request in (lcm, euler)])
    assert [outcome.batch_size for outcome in together] == [2, 2]  # they did share forwards
    for outcome, image in zip(together, alone):
        assert np.abs(outcome.image - image).max() <= FIDELITY_ATOL


def test_the_unguided_bucket_runs_a_lone_unguided_row_unpadded_and_never_recompiles(tiny_pipe):
    """`optimize.unguided_bucket`: the warm-up compiles a UNet call of one row at the default size
    and at each of `warmup_sizes`, so a lone unguided request runs one UNet row a step with no
    padding, and neither it, a guided request nor a mix recompiles the warmed UNet. Its image
    equals the one padded to two rows. Dynamo's limit is set below the warm-up's 6 graphs (3 UNet
    buckets at 2 sizes), as a GPU replica's 12 (buckets [1, 8], the one-row bucket, LoRA slots, one
    warm-up size) exceed its default 8, and hitting it fails: the warm-up must make room."""
    from configs.app_args import BatchingConfig
    from deployments.engine.factory import EngineFactory
    from deployments.pipelines import load_pipeline

    optimize = {
        "compile": "unet", "compile_backend": "eager", "batch_buckets": [1, 2], "warmup_sizes": [[96, 64]],
        "unguided_bucket": True,
    }
    spec = TinySpec(device="cpu", default_size=(64, 64), optimize=optimize)
    unguided = [
        GenerationRequest(prompt="a red circle", seed=5, num_inference_steps=3, guidance_scale=1.0, width=width, height=64)
        for width in (64, 96)
    ]
    guided = GenerationRequest(prompt="a blue square", seed=6, num_inference_steps=3, guidance_scale=5.0, **SIZE)
    images = []
    with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
        engine = EngineFactory(
            spec.model_dump(mode="json"), BatchingConfig(max_batch_size=2).model_dump(mode="json"),
            pipeline_factory=load_pipeline,
        )(None)
        assert engine.forward_calls.buckets == [1, 2, 4] and engine.decode_calls.buckets == [1, 2]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for request in unguided:
                before = engine.stats()
                images.append(_one(engine, request).image)
                after = engine.stats()
                counts = [after[name] - before[name] for name in ("unet_calls", "unet_rows", "padded_unet_rows")]
                assert counts == [3, 3, 0]  # one row a step, unpadded
            _one(engine, guided)
            mixed = engine.generate([request.with_defaults(SPEC) for request in (guided, *unguided)])
    assert all(isinstance(outcome, RunOutput) for outcome in mixed)
    padding = StepEngine(tiny_pipe, buckets=[1, 2])  # each unguided row padded to two
    for request, image in zip(unguided, images):
        assert np.abs(image - _one(padding, request).image).max() <= FIDELITY_ATOL
