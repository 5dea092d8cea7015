"""The hires pass on the tiny model (fp32 CPU, no Ray): a hires request equals plain diffusers
txt2img then `StableDiffusionXLImg2ImgPipeline` at the larger size with the same generator (with
a LoRA in both passes, with a ControlNet in the first); it shares steps with other rows without
changing their images or its own; progress counts both passes; tiled VAE decodes stay within a
measured bound of untiled ones."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    ControlNetModel,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from configs.model_spec import TINY_CONTROLNET_CANNY_DIR, TINY_LORA_DIR, TinySpec
from deployments.engine.control import RunOutput
from deployments.engine.lora import AdapterCache
from deployments.engine.loop import StepEngine
from deployments.engine.rows import decode, vae_tiling
from deployments.lora_registry import LoraRegistry
from deployments.pipelines import load_pipeline, make_scheduler
from deployments.types import ControlRef, GenerationRequest, HiresSettings, InvalidRequestError, LoraRef

FIDELITY_ATOL = 1e-4
SPEC = TinySpec(device="cpu")
FIRST = dict(width=64, height=64, num_inference_steps=4, guidance_scale=5.0)


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Plain diffusers txt2img and img2img over one independently loaded set of components."""
    txt2img = StableDiffusionXLPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(txt2img)
    for pipe in (txt2img, img2img):
        pipe.set_progress_bar_config(disable=True)
    return txt2img, img2img, txt2img.scheduler.config


@pytest.fixture(scope="module")
def engine(tiny_pipe):
    return StepEngine(tiny_pipe, max_rows=8)


def _request(seed: int, scheduler: str, **hires) -> GenerationRequest:
    return GenerationRequest(
        prompt="a large red star on a blue background", negative_prompt="blurry", seed=seed,
        scheduler=scheduler, hires=HiresSettings(**hires), **FIRST,
    ).with_defaults(SPEC)


def _diffusers_hires(reference, request: GenerationRequest, **first_pass) -> np.ndarray:
    """txt2img (with `first_pass`'s extra arguments), the upscale as the README states it,
    img2img, one generator throughout."""
    txt2img, img2img, config = reference
    hires = request.hires
    generator = torch.Generator("cpu").manual_seed(request.seed)
    common = dict(prompt=request.prompt, negative_prompt=request.negative_prompt, guidance_scale=request.guidance_scale)
    txt2img.scheduler = make_scheduler(request.scheduler, config)
    lanczos = hires.upscaler == "lanczos"
    first = txt2img(
        **common, width=request.width, height=request.height, num_inference_steps=request.num_inference_steps,
        generator=generator, output_type="pil" if lanczos else "latent", **first_pass,
    ).images
    if lanczos:
        image = first[0].resize((hires.width, hires.height), Image.LANCZOS)
    else:
        image = F.interpolate(first, size=(hires.height // 8, hires.width // 8), mode="bilinear")
    img2img.scheduler = make_scheduler(request.scheduler, config)
    return img2img(
        **common, image=image, strength=hires.strength, num_inference_steps=hires.steps,
        generator=generator, output_type="np",
    ).images[0]


@pytest.mark.parametrize(
    ("upscaler", "scheduler"), [("lanczos", "euler"), ("lanczos", "euler_a"), ("latent", "euler_a"), ("latent", "dpmpp_2m")]
)
def test_hires_matches_txt2img_then_img2img_in_diffusers(engine, reference, upscaler, scheduler):
    request = _request(3, scheduler, scale=1.5, strength=0.5, steps=6, upscaler=upscaler)
    (ours,) = engine.generate([request])
    assert isinstance(ours, RunOutput) and ours.image.shape == (96, 96, 3)
    assert np.abs(ours.image - _diffusers_hires(reference, request)).max() <= FIDELITY_ATOL


def test_a_hires_request_sharing_steps_equals_it_alone(engine):
    hires = _request(5, "euler_a", width=128, height=96, strength=0.6, steps=5, upscaler="latent")
    plain = GenerationRequest(prompt="a green square", seed=6, scheduler="euler", **FIRST).with_defaults(SPEC)
    longer = plain.model_copy(update={"num_inference_steps": 9, "seed": 7})
    alone = [engine.generate([request])[0].image for request in (hires, plain, longer)]
    together = engine.generate([hires, plain, longer])
    assert together[0].image.shape == (96, 128, 3)
    for outcome, image in zip(together, alone):
        assert np.abs(outcome.image - image).max() <= FIDELITY_ATOL
    assert together[0].batch_size == 3  # its first pass shared forwards with both others


def test_loras_apply_to_both_passes(tiny_dir, tmp_path):
    """The second pass keeps the first's LoRA slot: a hires request with `pastel` at 0.7 equals
    diffusers with the adapter set for both calls, and its LoRA slot is free once it is done."""
    pipe = load_pipeline(SPEC)  # its own: LoRA layers get wrapped
    cache = AdapterCache(pipe, LoraRegistry(tmp_path, builtin=(TINY_LORA_DIR,)), size=2, max_rank=64)
    lora_engine = StepEngine(pipe, max_rows=4, adapters=cache)
    request = _request(4, "euler", scale=1.5, strength=0.5, steps=6).model_copy(
        update={"loras": (LoraRef(name="pastel", weight=0.7),)}
    )
    (ours,) = lora_engine.generate([request])
    assert isinstance(ours, RunOutput), ours
    txt2img = StableDiffusionXLPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    txt2img.set_progress_bar_config(disable=True)
    txt2img.load_lora_weights(TINY_LORA_DIR, weight_name="pastel.safetensors", adapter_name="pastel")
    txt2img.set_adapters(["pastel"], [0.7])
    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(txt2img)
    img2img.set_progress_bar_config(disable=True)
    expected = _diffusers_hires((txt2img, img2img, txt2img.scheduler.config), request)
    assert np.abs(ours.image - expected).max() <= FIDELITY_ATOL
    assert not any(cache._pins.values())  # released once, after the second pass


def test_a_controlnet_steers_the_first_pass_only(tiny_pipe, reference):
    """Equals diffusers' ControlNet pipeline for the first pass, then plain img2img."""
    net = ControlNetModel.from_pretrained(TINY_CONTROLNET_CANNY_DIR, dtype=torch.float32)
    steered_engine = StepEngine(tiny_pipe, max_rows=4, controlnets={"canny": net})
    edges = np.zeros((64, 64, 3), dtype=np.uint8)
    edges[12:52, 20] = edges[12:52, 43] = edges[12, 20:44] = edges[51, 20:44] = 255
    request = _request(9, "euler_a", scale=1.5, strength=0.5, steps=6).model_copy(
        update={"controlnets": (ControlRef(name="canny", image=edges),)}
    )
    (ours,) = steered_engine.generate([request])
    txt2img, img2img, config = reference
    steered = StableDiffusionXLControlNetPipeline.from_pipe(txt2img, controlnet=net)
    steered.set_progress_bar_config(disable=True)
    expected = _diffusers_hires((steered, img2img, config), request, image=Image.fromarray(edges))
    assert np.abs(ours.image - expected).max() <= FIDELITY_ATOL


def test_progress_counts_both_passes(engine):
    request = _request(8, "euler", scale=2.0, strength=0.5, steps=6)
    assert request.progress_steps() == 4 + 3
    seen = []
    control = engine.submit(request)
    control._on_progress = lambda step, total: seen.append((step, total))
    engine.run_until_idle()
    assert seen == [(step, 7) for step in range(1, 8)]
    assert control.outcome.image.shape == (128, 128, 3)


def test_hires_settings_resolve_and_refuse_with_the_field_named():
    resolved = _request(1, "euler").hires
    assert (resolved.width, resolved.height, resolved.strength, resolved.steps, resolved.upscaler) == (128, 128, 0.4, 4, "lanczos")
    assert _request(1, "euler", scale=1.3).hires.width == 80  # 83.2 rounded to a multiple of 8
    with pytest.raises(InvalidRequestError) as smaller:
        _request(1, "euler", width=48, height=64)
    assert smaller.value.param == "hires.width" and "48" in str(smaller.value)
    with pytest.raises(InvalidRequestError) as no_step:
        _request(1, "euler", strength=0.1, steps=4)
    assert no_step.value.param == "hires.strength"
    for bad in ({"width": 128}, {"scale": 2.0, "width": 128, "height": 128}, {"scale": 1.0}, {"upscaler": "bicubic"}):
        with pytest.raises(ValueError):
            HiresSettings(**bad)
    with pytest.raises(ValueError, match="txt2img"):
        GenerationRequest(prompt="p", kind="img2img", init_image=np.zeros((64, 64, 3), np.uint8), hires=HiresSettings())


def test_tiled_decode_stays_within_its_measured_bound(tiny_pipe):
    """The tiny VAE tiles at its sample_size (128 px): a 256² decode runs as 4 overlapping tiles,
    blended. Measured on 8 rendered scenes (pixels in [0, 1]): mean difference 0.027, 99th
    percentile 0.24, max 0.65 — each tile's GroupNorm sees only its own area, which shifts a
    tile's colours (256-px tiles of 512² images: 0.025 / 0.23). The bound keeps a small margin."""
    from training import shapes

    images = shapes.render(shapes.sample_scenes(8, torch.Generator().manual_seed(0)), 256)
    vae = tiny_pipe.vae
    with torch.no_grad():
        latents = vae.encode(images * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        with vae_tiling(vae, 256 * 256, above=None):
            whole = decode(tiny_pipe, latents)
        with vae_tiling(vae, 256 * 256, above=128 * 128):
            tiled = decode(tiny_pipe, latents)
    difference = ((whole - tiled).abs() / 2).flatten()
    assert 0 < difference.mean() <= 0.035
    assert difference.kthvalue(int(0.99 * difference.numel())).values <= 0.3
    assert vae.use_tiling is False  # restored after each call


def test_warmup_sizes_compile_a_hires_pass_before_serving():
    """`optimize.warmup_sizes` runs the UNet at each listed size and bucket during the warm-up, so
    a compiled replica's first hires request (its second pass at the target size) compiles
    nothing: the request runs under `error_on_recompile`."""
    from configs.app_args import BatchingConfig
    from deployments.engine.factory import EngineFactory

    optimize = {"compile": "unet", "compile_backend": "eager", "batch_buckets": [1, 2], "warmup_sizes": [[128, 96]]}
    spec = TinySpec(device="cpu", default_size=(64, 64), optimize=optimize)
    latent_sizes: set[tuple[int, int, int]] = set()
    engine = EngineFactory(
        spec.model_dump(mode="json"), BatchingConfig(max_batch_size=2).model_dump(mode="json"),
        pipeline_factory=lambda spec: _recording_unet_shapes(load_pipeline(spec), latent_sizes),
    )(None)
    # Guided rows: a UNet call of 2 or 4 rows, at the default 64² (8² latents) and at 128x96.
    assert {(2, 8, 8), (4, 8, 8), (2, 12, 16), (4, 12, 16)} <= latent_sizes
    request = _request(3, "euler", width=128, height=96, strength=0.5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        (outcome,) = engine.generate([request])
    assert isinstance(outcome, RunOutput) and outcome.image.shape == (96, 128, 3)


def _recording_unet_shapes(pipe, shapes: set):
    pipe.unet.register_forward_pre_hook(lambda module, args: shapes.add(tuple(args[0].shape[:1]) + tuple(args[0].shape[2:])))
    return pipe
