"""`guidance_end` (classifier-free guidance on the first part of the steps only) on the tiny model,
fp32 CPU, no Ray: every kind a row can be (txt2img with several schedulers, img2img, inpaint,
ControlNet, LoRA, both passes of a hires request) equals plain diffusers with the dynamic-CFG
callback its docs give; such a row sharing forwards with ordinary rows equals it alone; 1 is the
ordinary image exactly; the UNet runs fewer rows; values and combinations that cannot apply are
refused naming the field."""

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from PIL import Image
from pydantic import ValidationError

from configs.model_spec import TINY_CONTROLNET_CANNY_DIR, TINY_LORA_DIR, TinySpec
from deployments.engine.control import RunOutput
from deployments.engine.lora import AdapterCache
from deployments.engine.loop import StepEngine
from deployments.lora_registry import LoraRegistry
from deployments.pipelines import load_pipeline, make_scheduler
from deployments.types import (
    ControlRef,
    GenerationRequest,
    HiresSettings,
    InvalidRequestError,
    LoraRef,
    RefinerSettings,
    guided_steps,
)

FIDELITY_ATOL = 1e-4
SPEC = TinySpec(device="cpu")
SMALL = dict(width=64, height=64, num_inference_steps=10, guidance_scale=5.0, scheduler="euler")
#: What the SDXL pipelines double for guidance and the callback halves (the inpainting pipeline
#: also doubles its mask, the ControlNet pipeline its map).
HALVED = ("prompt_embeds", "add_text_embeds", "add_time_ids")


def dynamic_cfg(fraction: float, halved: tuple[str, ...] = HALVED) -> dict:
    """The keyword arguments of diffusers' documented dynamic classifier-free guidance
    ("Pipeline callbacks"): after the step at index `int(pipe.num_timesteps * fraction)`, keep
    the conditional half of every doubled input and turn guidance off for the steps left."""

    def callback(pipe, step_index, timestep, callback_kwargs):
        if step_index == int(pipe.num_timesteps * fraction):
            for name in halved:
                callback_kwargs[name] = callback_kwargs[name].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return callback_kwargs

    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": list(halved)}


def _quiet(pipe, scheduler_config=None):
    """`pipe` without progress bars, remembering the scheduler config each call starts from (a
    scheduler made from another's config would inherit its options)."""
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = scheduler_config or pipe.scheduler.config
    return pipe


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Plain diffusers txt2img, img2img and inpaint over one independently loaded set of weights."""
    txt2img = _quiet(StableDiffusionXLPipeline.from_pretrained(tiny_dir, dtype=torch.float32))
    config = txt2img.original_scheduler_config
    return {
        "txt2img": txt2img,
        "img2img": _quiet(StableDiffusionXLImg2ImgPipeline.from_pipe(txt2img), config),
        "inpaint": _quiet(StableDiffusionXLInpaintPipeline.from_pipe(txt2img), config),
    }


@pytest.fixture(scope="module")
def engine(tiny_pipe):
    return StepEngine(tiny_pipe, max_rows=8)


def _resolved(**fields) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a red circle on a blue background", "negative_prompt": "blurry", **SMALL, **fields}).with_defaults(SPEC)


def _alone(engine: StepEngine, request: GenerationRequest) -> np.ndarray:
    (outcome,) = engine.generate([request])
    assert isinstance(outcome, RunOutput), outcome
    return outcome.image


def _call(pipe, request: GenerationRequest, halved: tuple[str, ...] = HALVED, generator=None, **extra):
    """`pipe` run as the request asks, with the dynamic-CFG callback at its `guidance_end`."""
    pipe.scheduler = make_scheduler(request.scheduler, pipe.original_scheduler_config)
    return pipe(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        generator=generator or torch.Generator("cpu").manual_seed(request.seed),
        **dynamic_cfg(request.guidance_end, halved),
        **extra,
    ).images


def _picture(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)


# --- fidelity: each kind equals diffusers with the callback ----------------------------------------


@pytest.mark.parametrize(
    "guidance_end, scheduler",
    [(0.4, "euler"), (0.75, "euler_a"), (0.5, "dpmpp_2m_karras"), (0.3, "heun"), (0.05, "ddim"), (0.85, "unipc")],
)
def test_txt2img_matches_diffusers_dynamic_cfg(engine, reference, guidance_end, scheduler):
    request = _resolved(guidance_end=guidance_end, scheduler=scheduler, seed=3)
    expected = _call(reference["txt2img"], request, width=64, height=64, output_type="np")[0]
    assert np.abs(_alone(engine, request) - expected).max() <= FIDELITY_ATOL


def test_ending_guidance_changes_the_image(engine):
    """A test that can fail: ending guidance early moves the image (else the fidelity tests above
    would pass with guidance_end ignored)."""
    ordinary = _alone(engine, _resolved(seed=3))
    assert np.abs(_alone(engine, _resolved(seed=3, guidance_end=0.4)) - ordinary).max() > 0.01


def test_img2img_matches_diffusers_dynamic_cfg(engine, reference):
    request = _resolved(kind="img2img", init_image=_picture(1), strength=0.6, scheduler="euler_a", guidance_end=0.5, seed=4)
    expected = _call(reference["img2img"], request, image=Image.fromarray(request.init_image), strength=0.6, output_type="np")[0]
    assert np.abs(_alone(engine, request) - expected).max() <= FIDELITY_ATOL


@pytest.mark.parametrize("padding_mask_crop", [None, 4])
def test_inpaint_matches_diffusers_dynamic_cfg(engine, reference, padding_mask_crop):
    """The inpainting pipeline doubles its mask (and masked-image latents) too: the callback
    halves them, or the per-step blend would turn the latents into a batch of two. A crop is
    pasted back through PIL (8-bit), so it compares as 8-bit pixels."""
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    request = _resolved(
        kind="inpaint", init_image=_picture(2), mask_image=mask, strength=0.9, mask_blur=2,
        padding_mask_crop=padding_mask_crop, guidance_end=0.6, seed=9,
    )
    blurred = VaeImageProcessor.blur(Image.fromarray(mask), blur_factor=2)
    (expected,) = _call(
        reference["inpaint"], request, (*HALVED, "mask", "masked_image_latents"), image=Image.fromarray(request.init_image),
        mask_image=blurred, strength=0.9, padding_mask_crop=padding_mask_crop, height=64, width=64,
        output_type="np" if padding_mask_crop is None else "pil",
    )
    expected = expected if padding_mask_crop is None else np.asarray(expected, dtype=np.float32) / 255.0
    assert np.abs(_alone(engine, request) - expected).max() <= FIDELITY_ATOL


@pytest.fixture(scope="module")
def canny_net():
    return ControlNetModel.from_pretrained(TINY_CONTROLNET_CANNY_DIR, dtype=torch.float32)


def _edges() -> np.ndarray:
    edges = np.zeros((64, 64, 3), dtype=np.uint8)
    edges[12:52, 20] = edges[12:52, 43] = edges[12, 20:44] = edges[51, 20:44] = 255
    return edges


def test_a_controlnet_row_matches_diffusers_dynamic_cfg(tiny_pipe, reference, canny_net):
    """The ControlNet runs on the UNet rows of each step: both halves while guided, the
    conditional one after (the callback halves the ControlNet pipeline's map as well), here with
    the ControlNet's own window ending after guidance does."""
    steered = StepEngine(tiny_pipe, max_rows=4, controlnets={"canny": canny_net})
    control = ControlRef(name="canny", image=_edges(), conditioning_scale=0.8, guidance_end=0.8)
    request = _resolved(controlnets=(control,), guidance_end=0.4, scheduler="euler_a", seed=11)
    pipe = _quiet(StableDiffusionXLControlNetPipeline.from_pipe(reference["txt2img"], controlnet=canny_net))
    (expected,) = _call(
        pipe, request, (*HALVED, "image"), image=Image.fromarray(control.image), controlnet_conditioning_scale=0.8,
        control_guidance_end=0.8, width=64, height=64, output_type="np",
    )
    alone = _alone(steered, request)
    assert np.abs(alone - expected).max() <= FIDELITY_ATOL
    plain = _resolved(guidance_end=0.4, seed=12)  # sharing the ControlNet's call with an unsteered row
    steered_together, _ = steered.generate([request, plain])
    assert np.abs(steered_together.image - alone).max() <= FIDELITY_ATOL


def test_a_lora_row_matches_diffusers_dynamic_cfg(tiny_dir, tmp_path):
    pipe = load_pipeline(SPEC)  # its own: LoRA layers get wrapped
    cache = AdapterCache(pipe, LoraRegistry(tmp_path, builtin=(TINY_LORA_DIR,)), size=2, max_rank=64)
    lora_engine = StepEngine(pipe, max_rows=4, adapters=cache)
    request = _resolved(loras=(LoraRef(name="pastel", weight=0.7),), guidance_end=0.5, seed=5)
    reference = _quiet(StableDiffusionXLPipeline.from_pretrained(tiny_dir, dtype=torch.float32))
    reference.load_lora_weights(TINY_LORA_DIR, weight_name="pastel.safetensors", adapter_name="pastel")
    reference.set_adapters(["pastel"], [0.7])
    (expected,) = _call(reference, request, width=64, height=64, output_type="np")
    assert np.abs(_alone(lora_engine, request) - expected).max() <= FIDELITY_ATOL


def test_each_hires_pass_ends_guidance_at_its_own_fraction(engine, reference):
    """Both passes are diffusers calls with the callback: txt2img, Lanczos upscale, img2img with
    the same generator. The second pass starts guided again, from the stored unconditional rows."""
    request = _resolved(
        hires=HiresSettings(scale=1.5, strength=0.5, steps=8), guidance_end=0.5, scheduler="euler_a", seed=6,
        num_inference_steps=6,
    )
    generator = torch.Generator("cpu").manual_seed(request.seed)
    (first,) = _call(reference["txt2img"], request, width=64, height=64, output_type="pil", generator=generator)
    hires = request.hires
    second = request.model_copy(update={"num_inference_steps": hires.steps})
    (expected,) = _call(
        reference["img2img"], second, image=first.resize((hires.width, hires.height), Image.LANCZOS),
        strength=hires.strength, output_type="np", generator=generator,
    )
    assert np.abs(_alone(engine, request) - expected).max() <= FIDELITY_ATOL


# --- sharing, the default, the work saved --------------------------------------------------------


def test_rows_ending_guidance_share_forwards_and_each_equals_it_alone(engine):
    requests = [
        _resolved(guidance_end=0.4, seed=1),
        _resolved(seed=2, prompt="a green square"),  # guided on every step
        _resolved(guidance_end=0.7, seed=3, num_inference_steps=6, scheduler="dpmpp_2m"),
        _resolved(guidance_scale=1.0, seed=4),  # never guided
    ]
    alone = [_alone(engine, request) for request in requests]
    together = engine.generate(requests)
    for outcome, image in zip(together, alone):
        assert outcome.batch_size == 4
        assert np.abs(outcome.image - image).max() <= FIDELITY_ATOL


def test_buckets_pad_a_row_past_its_guidance_end_without_changing_it(tiny_pipe, engine):
    """With compiled sizes (UNet calls of 2 and 4 rows), the one UNet row a lone image runs once
    guidance ends is padded to a call of 2."""
    request = _resolved(guidance_end=0.4, seed=8)
    bucketed = StepEngine(tiny_pipe, max_rows=4, buckets=[1, 2])
    assert np.abs(_alone(bucketed, request) - _alone(engine, request)).max() <= FIDELITY_ATOL
    assert bucketed.stats()["padded_unet_rows"] == 5  # the five unguided steps


def test_guidance_end_1_is_the_ordinary_image(engine, reference):
    """The default guides every step: plain diffusers without a callback, and bit for bit a value
    whose cut falls on the last of 10 steps (0.95: the callback would fire after step 9)."""
    ordinary = _resolved(seed=12)
    assert ordinary.guidance_end == 1.0
    pipe = reference["txt2img"]
    pipe.scheduler = make_scheduler(ordinary.scheduler, pipe.original_scheduler_config)
    plain = pipe(
        prompt=ordinary.prompt, negative_prompt=ordinary.negative_prompt, width=64, height=64,
        num_inference_steps=ordinary.num_inference_steps, guidance_scale=ordinary.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(ordinary.seed), output_type="np",
    ).images[0]
    image = _alone(engine, ordinary)
    assert np.abs(image - plain).max() <= FIDELITY_ATOL
    assert np.array_equal(image, _alone(engine, ordinary.model_copy(update={"guidance_end": 0.95})))


@pytest.mark.parametrize("guidance_end, guided", [(1.0, 10), (0.99, 10), (0.8, 9), (0.4, 5), (0.05, 1)])
def test_the_unet_runs_one_row_per_step_after_guidance_ends(engine, guidance_end, guided):
    """Ten steps: two UNet rows for each guided step (diffusers' boundary: the step at index
    int(10 × guidance_end) is still guided), one for each step after."""
    assert guided_steps(10, guidance_end) == guided
    before = engine.stats()["unet_rows"]
    _alone(engine, _resolved(guidance_end=guidance_end, seed=1))
    assert engine.stats()["unet_rows"] - before == 2 * guided + (10 - guided)


def test_progress_and_steps_are_unchanged(engine):
    seen = []
    control = engine.submit(_resolved(guidance_end=0.3, seed=2, num_inference_steps=5))
    control._on_progress = lambda step, total: seen.append((step, total))
    engine.run_until_idle()
    assert seen == [(step, 5) for step in range(1, 6)]


# --- refusals --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, -0.5, 1.01, 2])
def test_out_of_range_values_are_refused(value):
    with pytest.raises(ValidationError) as info:
        GenerationRequest(prompt="p", guidance_end=value)
    assert info.value.errors()[0]["loc"] == ("guidance_end",)


def test_without_guidance_there_is_none_to_end():
    with pytest.raises(InvalidRequestError) as explicit:
        GenerationRequest(prompt="p", guidance_scale=1.0, guidance_end=0.5).with_defaults(SPEC)
    assert explicit.value.param == "guidance_end" and "0.5" in explicit.value.message and explicit.value.status_code == 400
    unguided_model = TinySpec(device="cpu", default_guidance_scale=0.0)
    with pytest.raises(InvalidRequestError, match="guidance_scale is 0.0"):
        GenerationRequest(prompt="p", guidance_end=0.5).with_defaults(unguided_model)
    assert GenerationRequest(prompt="p", guidance_scale=1.0, guidance_end=1.0).with_defaults(SPEC).guidance_end == 1.0


def test_the_refiner_is_refused():
    with pytest.raises(InvalidRequestError) as info:
        GenerationRequest(prompt="p", guidance_end=0.6, refiner=RefinerSettings()).with_defaults(SPEC)
    assert info.value.param == "guidance_end" and "refiner" in info.value.message
