"""The refiner stage on the tiny family (fp32 CPU, no Ray): a base engine hands latents to a
refiner engine, and the result equals plain diffusers' base → refiner pair for the same generator;
rows of both stages sharing forwards equal their solo results."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from configs.model_spec import TINY_MODEL_DIR, TinySpec
from deployments.engine.control import LatentsOutput, RunOutput
from deployments.engine.loop import StepEngine
from deployments.pipelines import build_random_refiner, make_scheduler
from deployments.types import GenerationRequest, Handoff, InvalidRequestError, LoraRef, RefinerSettings

FIDELITY_ATOL = 1e-4
SPEC = TinySpec(device="cpu")
SMALL = dict(width=64, height=64, num_inference_steps=6, guidance_scale=5.0, scheduler="euler")


@pytest.fixture(scope="module")
def refiner_pipe(tmp_path_factory):
    """A refiner of the tiny family's layout with random weights (fidelity needs no training):
    the base UNet's blocks, cross-attention on the second text encoder only (64 wide), and time
    ids of 5 values with the aesthetic score (5 × 8 + 64 pooled)."""
    folder = tmp_path_factory.mktemp("tiny-refiner-arch")
    config = json.loads((TINY_MODEL_DIR / "unet" / "config.json").read_text())
    config.update(cross_attention_dim=64, projection_class_embeddings_input_dim=104)
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    pipe = build_random_refiner(folder, TINY_MODEL_DIR, seed=3, device=torch.device("cpu"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = pipe.scheduler.config
    return pipe


@pytest.fixture(scope="module")
def reference_base(tiny_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = pipe.scheduler.config
    return pipe


@pytest.fixture(scope="module")
def engines(tiny_pipe, refiner_pipe):
    return StepEngine(tiny_pipe, max_rows=8), StepEngine(refiner_pipe, max_rows=8, refiner=True)


def _request(refiner: dict, seed: int = 0, **changes) -> GenerationRequest:
    fields = {**SMALL, **changes}
    return GenerationRequest(prompt="a red circle", seed=seed, refiner=RefinerSettings(**refiner), **fields).with_defaults(SPEC)


def _handoff(request: GenerationRequest, output: LatentsOutput) -> GenerationRequest:
    assert isinstance(output, LatentsOutput), output
    handoff = Handoff(request.request_id, output.latents, output.generator_state, output.steps, output.batch_size)
    return request.model_copy(update={"handoff": handoff})


def _two_stages(engines, requests: list[GenerationRequest]) -> list[np.ndarray]:
    base, refiner = engines
    stage_two = [_handoff(request, output) for request, output in zip(requests, base.generate(requests))]
    outcomes = refiner.generate(stage_two)
    assert all(isinstance(outcome, RunOutput) for outcome in outcomes), outcomes
    return [outcome.image for outcome in outcomes]


def _reference(base, refiner, request: GenerationRequest) -> np.ndarray:
    """Plain diffusers: the base to `denoising_end` (or to the end) as latents, then the refiner
    from `denoising_start` (or at `strength`), one generator through both calls."""
    settings = request.refiner
    generator = torch.Generator("cpu").manual_seed(request.seed)
    base.scheduler = make_scheduler(request.scheduler, base.original_scheduler_config)
    refiner.scheduler = make_scheduler(request.scheduler, refiner.original_scheduler_config)
    common = dict(prompt=request.prompt, guidance_scale=request.guidance_scale, generator=generator)
    ensemble = settings.mode == "ensemble"
    latents = base(
        **common, width=request.width, height=request.height, num_inference_steps=request.num_inference_steps,
        denoising_end=settings.switch_at if ensemble else None, output_type="latent",
    ).images
    stage_two = {"denoising_start": settings.switch_at} if ensemble else {"strength": settings.strength}
    return refiner(
        **common, image=latents, num_inference_steps=settings.steps, aesthetic_score=settings.aesthetic_score,
        negative_aesthetic_score=settings.negative_aesthetic_score, output_type="np", **stage_two,
    ).images[0]


@pytest.mark.parametrize(
    "refiner, scheduler",
    [
        ({"mode": "ensemble"}, "euler"),
        ({"mode": "ensemble", "switch_at": 0.6, "aesthetic_score": 7.5}, "euler_a"),  # the generator runs on in stage two
        ({"mode": "ensemble", "steps": 10}, "dpmpp_2m"),
        ({"mode": "post"}, "euler"),
        ({"mode": "post", "strength": 0.5, "steps": 4, "negative_aesthetic_score": 1.0}, "euler_a"),
    ],
)
def test_two_stages_equal_diffusers_base_then_refiner(engines, reference_base, refiner_pipe, refiner, scheduler):
    request = _request(refiner, seed=7, scheduler=scheduler)
    (image,) = _two_stages(engines, [request])
    assert np.abs(image - _reference(reference_base, refiner_pipe, request)).max() <= FIDELITY_ATOL


def test_img2img_then_the_refiner_equals_diffusers(engines, reference_base, refiner_pipe):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    picture = np.random.default_rng(0).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    request = GenerationRequest(
        prompt="a blue square", seed=2, kind="img2img", init_image=picture, strength=0.9,
        refiner=RefinerSettings(switch_at=0.7), **{k: v for k, v in SMALL.items() if k not in ("width", "height")},
    ).with_defaults(SPEC)
    (image,) = _two_stages(engines, [request])
    base = StableDiffusionXLImg2ImgPipeline(**reference_base.components)
    base.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(2)
    base.scheduler = make_scheduler("euler", reference_base.original_scheduler_config)
    from PIL import Image

    latents = base(
        prompt=request.prompt, image=Image.fromarray(picture), strength=0.9, num_inference_steps=6, guidance_scale=5.0,
        generator=generator, denoising_end=0.7, output_type="latent",
    ).images
    refiner_pipe.scheduler = make_scheduler("euler", refiner_pipe.original_scheduler_config)
    expected = refiner_pipe(
        prompt=request.prompt, image=latents, num_inference_steps=6, guidance_scale=5.0, generator=generator,
        denoising_start=0.7, output_type="np",
    ).images[0]
    assert np.abs(image - expected).max() <= FIDELITY_ATOL


def test_rows_of_both_stages_sharing_forwards_equal_their_solo_images(engines, tiny_pipe, refiner_pipe):
    requests = [
        _request({"mode": "ensemble"}, seed=1),
        _request({"mode": "ensemble", "switch_at": 0.5}, seed=2, num_inference_steps=8, scheduler="euler_a"),
        _request({"mode": "post", "strength": 0.5}, seed=3, guidance_scale=1.0),
        _request({}, seed=5).model_copy(update={"refiner": None}),  # a plain row beside them in stage one
    ]
    fresh = StepEngine(tiny_pipe, max_rows=8), StepEngine(refiner_pipe, max_rows=8, refiner=True)
    base, refiner = fresh
    outputs = base.generate(requests)
    assert isinstance(outputs[3], RunOutput) and base.stats()["rows_per_forward"][0] == 4
    together = [outcome.image for outcome in refiner.generate([_handoff(r, o) for r, o in zip(requests[:3], outputs)])]
    assert refiner.stats()["rows_per_forward"][0] == 3  # the refiner stage ran them as one batch
    requests = requests[:3]
    for request, image in zip(requests, together):
        (alone,) = _two_stages(engines, [request])
        assert np.abs(image - alone).max() <= FIDELITY_ATOL


def test_the_refiner_stage_of_a_request_with_loras_runs_without_them(engines):
    """LoRAs steer the base stage only: the refiner engine (which serves none) runs the stage of
    a request naming one as it runs the same stage without (it used to refuse it with a 400
    after the base stage had run)."""
    base, refiner = engines
    request = _request({"mode": "ensemble", "switch_at": 0.5}, seed=4)
    (output,) = base.generate([request])
    plain = _handoff(request, output)
    styled = plain.model_copy(update={"loras": (LoraRef(name="pastel"),)})
    alone, with_loras = refiner.generate([plain]), refiner.generate([styled])
    assert isinstance(with_loras[0], RunOutput), with_loras[0]
    assert np.abs(with_loras[0].image - alone[0].image).max() == 0.0


def test_the_base_stage_ends_as_latents_and_each_engine_runs_its_own_stage_only(engines):
    base, refiner = engines
    request = _request({"mode": "ensemble", "switch_at": 0.5}, seed=4)
    (output,) = base.generate([request])
    # Euler's 6 timesteps (leading spacing) are 831, 665, 499, 333, 167, 1: the base keeps those
    # at or above the cut-off 500, as diffusers' `denoising_end` does.
    assert isinstance(output, LatentsOutput) and output.latents.shape == (4, 8, 8) and output.steps == 2
    with pytest.raises(InvalidRequestError, match="refiner stage"):
        refiner.submit(request)
    with pytest.raises(InvalidRequestError, match="base stage"):
        base.submit(_handoff(request, output))


@pytest.mark.parametrize(
    "refiner, kind, message",
    [
        ({"mode": "post", "switch_at": 0.5}, "txt2img", "switch_at applies to mode 'ensemble' only"),
        ({"mode": "ensemble", "strength": 0.5}, "txt2img", "strength applies to mode 'post' only"),
        ({"switch_at": 1.0}, "txt2img", "less than 1"),
        ({}, "inpaint", "refiner applies to txt2img and img2img only"),
    ],
)
def test_refiner_settings_are_checked(refiner, kind, message):
    images = {} if kind == "txt2img" else {
        "init_image": np.zeros((64, 64, 3), np.uint8), "mask_image": np.zeros((64, 64), np.uint8)
    }
    with pytest.raises(ValueError, match=message):
        GenerationRequest(prompt="p", kind=kind, refiner=refiner, **images)


def test_a_post_pass_below_one_step_is_refused():
    with pytest.raises(InvalidRequestError, match="below one step") as caught:
        _request({"mode": "post", "strength": 0.1, "steps": 5})
    assert caught.value.param == "refiner.strength"


def test_progress_counts_both_stages():
    assert _request({"mode": "ensemble"}, num_inference_steps=30).progress_steps() == 24 + 6
    assert _request({"mode": "post", "steps": 20}, num_inference_steps=30).progress_steps() == 30 + 6
    assert _request({"mode": "post"}, num_inference_steps=30).denoising_steps() == 30
