"""ControlNet rows in the step engine: fidelity against plain diffusers' ControlNet pipelines
(fp32 CPU), sharing (rows with and without control, different scales and windows, each equal to
their solo image) and refusals. On the trained tiny base and its canny ControlNet."""

import numpy as np
import pytest
import torch
from diffusers import (
    ControlNetModel,
    MultiControlNetModel,
    StableDiffusionXLControlNetImg2ImgPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

from configs.model_spec import TINY_CONTROLNET_CANNY_DIR, TinySpec
from deployments.engine.control import RunOutput
from deployments.engine.controlnets import control_map
from deployments.engine.loop import StepEngine
from deployments.pipelines import make_scheduler
from deployments.types import ControlRef, GenerationRequest, InvalidRequestError

FIDELITY_ATOL = 1e-4
SPEC = TinySpec(device="cpu")
SMALL = dict(width=64, height=64, num_inference_steps=4, guidance_scale=5.0, scheduler="euler")


def _shape_map(box=(12, 20, 44, 52)) -> np.ndarray:
    """A white square outline on black: the kind of map the canny ControlNet was trained on."""
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    top, left, bottom, right = box
    image[top:bottom, left] = image[top:bottom, right - 1] = 255
    image[top, left:right] = image[bottom - 1, left:right] = 255
    return image


@pytest.fixture(scope="module")
def canny_net():
    return ControlNetModel.from_pretrained(TINY_CONTROLNET_CANNY_DIR, dtype=torch.float32)


@pytest.fixture(scope="module")
def engine(tiny_pipe, canny_net):
    # The same weights under a second name stand in for a second ControlNet of one deployment.
    return StepEngine(tiny_pipe, max_rows=16, controlnets={"canny": canny_net, "canny-b": canny_net})


@pytest.fixture(scope="module")
def reference_pipe(tiny_dir, canny_net):
    base = StableDiffusionXLPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe = StableDiffusionXLControlNetPipeline.from_pipe(base, controlnet=canny_net)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(engine, requests):
    return engine.generate([request.with_defaults(SPEC) for request in requests])


def _alone(engine, request) -> np.ndarray:
    (outcome,) = _run(engine, [request])
    assert isinstance(outcome, RunOutput), outcome
    return outcome.image


def _control(name="canny", image=None, **settings) -> ControlRef:
    return ControlRef(name=name, image=_shape_map() if image is None else image, **settings)


def _reference(pipe, request: GenerationRequest, **extra) -> np.ndarray:
    (control,) = request.controlnets
    pipe.scheduler = make_scheduler(request.scheduler, pipe.scheduler.config)
    return pipe(
        prompt=request.prompt,
        image=Image.fromarray(control.image),
        controlnet_conditioning_scale=control.conditioning_scale,
        control_guidance_start=control.guidance_start,
        control_guidance_end=control.guidance_end,
        width=request.width,
        height=request.height,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="np",
        **extra,
    ).images[0]


@pytest.mark.parametrize(
    "settings",
    [{}, {"conditioning_scale": 0.6}, {"guidance_start": 0.25, "guidance_end": 0.75}, {"guidance_end": 0.5}],
    ids=["plain", "scale", "window", "early"],
)
def test_txt2img_with_a_controlnet_matches_plain_diffusers(engine, reference_pipe, settings):
    request = GenerationRequest(prompt="a red square", seed=11, controlnets=(_control(**settings),), **SMALL)
    ours = _alone(engine, request)
    assert np.abs(ours - _reference(reference_pipe, request)).max() <= FIDELITY_ATOL


def test_the_controlnet_changes_the_image(engine):
    """A test that can fail: the map steers (else every fidelity test above passes trivially)."""
    plain = GenerationRequest(prompt="a red square", seed=11, **SMALL)
    steered = plain.model_copy(update={"controlnets": (_control(),)})
    assert np.abs(_alone(engine, plain) - _alone(engine, steered)).max() > 0.05


def test_img2img_with_a_controlnet_matches_plain_diffusers(engine, reference_pipe):
    picture = np.random.default_rng(3).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    request = GenerationRequest(
        prompt="a blue circle", seed=5, kind="img2img", init_image=picture, strength=0.6,
        controlnets=(_control(conditioning_scale=0.8),), num_inference_steps=5, guidance_scale=4.0, scheduler="euler_a",
    )
    pipe = StableDiffusionXLControlNetImg2ImgPipeline.from_pipe(reference_pipe)
    pipe.set_progress_bar_config(disable=True)
    (control,) = request.controlnets
    pipe.scheduler = make_scheduler(request.scheduler, pipe.scheduler.config)
    reference = pipe(
        prompt=request.prompt,
        image=Image.fromarray(picture),
        control_image=Image.fromarray(control.image),
        strength=request.strength,
        controlnet_conditioning_scale=control.conditioning_scale,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="np",
    ).images[0]
    assert np.abs(_alone(engine, request) - reference).max() <= FIDELITY_ATOL


def test_two_controlnets_match_diffusers_multi_controlnet(engine, reference_pipe, canny_net):
    other_map = _shape_map((30, 8, 58, 36))
    request = GenerationRequest(
        prompt="a green triangle", seed=2,
        controlnets=(_control(conditioning_scale=0.7), _control("canny-b", other_map, conditioning_scale=0.4, guidance_end=0.5)),
        **SMALL,
    )
    pipe = StableDiffusionXLControlNetPipeline.from_pipe(reference_pipe, controlnet=MultiControlNetModel([canny_net, canny_net]))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler(request.scheduler, pipe.scheduler.config)
    reference = pipe(
        prompt=request.prompt,
        image=[Image.fromarray(_shape_map()), Image.fromarray(other_map)],
        controlnet_conditioning_scale=[0.7, 0.4],
        control_guidance_start=[0.0, 0.0],
        control_guidance_end=[1.0, 0.5],
        width=64, height=64, num_inference_steps=4, guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(2),
        output_type="np",
    ).images[0]
    assert np.abs(_alone(engine, request) - reference).max() <= FIDELITY_ATOL


def test_rows_with_and_without_control_share_a_step_and_each_equals_its_solo_image(engine):
    requests = [
        GenerationRequest(prompt="a red square", seed=1, **SMALL),
        GenerationRequest(prompt="a red square", seed=1, controlnets=(_control(),), **SMALL),
        GenerationRequest(prompt="a blue circle", seed=4, controlnets=(_control(conditioning_scale=0.3, guidance_start=0.5),), **SMALL),
        GenerationRequest(prompt="a pink star", seed=9, controlnets=(_control("canny-b", _shape_map((4, 4, 30, 30))),), **{**SMALL, "num_inference_steps": 6, "guidance_scale": 1.0}),
    ]
    solo = [_alone(engine, request) for request in requests]
    together = _run(engine, requests)
    assert all(outcome.batch_size == len(requests) for outcome in together)
    for outcome, alone in zip(together, solo):
        assert np.abs(outcome.image - alone).max() <= FIDELITY_ATOL


def test_an_unhosted_controlnet_is_refused_naming_the_field(engine):
    request = GenerationRequest(prompt="a square", seed=1, controlnets=(_control("depth"),), **SMALL).with_defaults(SPEC)
    with pytest.raises(InvalidRequestError) as error:
        engine.submit(request)
    assert error.value.param == "controlnets.0.name" and "canny" in error.value.message


def test_a_base_engine_refuses_control(tiny_pipe):
    request = GenerationRequest(prompt="a square", seed=1, controlnets=(_control(),), **SMALL).with_defaults(SPEC)
    with pytest.raises(InvalidRequestError, match="serves: none"):
        StepEngine(tiny_pipe).submit(request)


def test_a_control_image_of_another_size_is_refused():
    with pytest.raises(ValueError, match=r"controlnets.0.image is 64x64 but the image is 128x64"):
        GenerationRequest(prompt="a square", width=128, height=64, controlnets=(_control(),))


def test_the_control_image_sets_the_size_when_none_is_given():
    request = GenerationRequest(prompt="a square", controlnets=(_control(image=np.zeros((48, 80, 3), np.uint8)),))
    resolved = request.with_defaults(SPEC)
    assert (resolved.width, resolved.height) == (80, 48)


@pytest.mark.parametrize("bad", [{"guidance_start": 0.6, "guidance_end": 0.5}, {"low_threshold": 0.1}])
def test_inconsistent_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        _control(**bad)


def test_canny_thresholds_are_taken_in_either_order_as_opencv_does():
    picture = np.zeros((64, 64, 3), dtype=np.uint8)
    picture[12:52, 20:44] = (90, 90, 90)
    given = control_map(_control(image=picture, preprocess="canny", low_threshold=0.02, high_threshold=0.08))
    swapped = control_map(_control(image=picture, preprocess="canny", low_threshold=0.08, high_threshold=0.02))
    assert np.array_equal(given, swapped) and given.any()


def test_canny_preprocessing_makes_the_map_inside_the_engine(engine):
    """`preprocess: canny` on a picture gives the image the same map, made beforehand, gives."""
    picture = np.zeros((64, 64, 3), dtype=np.uint8)
    picture[12:52, 20:44] = (220, 40, 40)
    made = _control(image=picture, preprocess="canny")
    edges = control_map(made)
    assert edges.shape == (64, 64, 3) and set(np.unique(edges)) == {0, 255}
    request = GenerationRequest(prompt="a red square", seed=3, controlnets=(made,), **SMALL)
    given = request.model_copy(update={"controlnets": (_control(image=edges),)})
    assert np.abs(_alone(engine, request) - _alone(engine, given)).max() == 0.0


def test_no_mix_of_control_and_loras_recompiles_a_compiled_unet(tmp_path, canny_net):
    """The warm-up compiles every branch a forward can take (plain, steered, and both with the
    LoRA slot layers), so no request mixing them recompiles while serving."""
    from configs.app_args import DEFAULT_LORA_TARGETS
    from configs.model_spec import TINY_LORA_DIR
    from deployments.engine.lora import AdapterCache
    from deployments.lora_registry import LoraRegistry
    from deployments.pipelines import load_pipeline
    from deployments.types import LoraRef

    pipe = load_pipeline(SPEC)
    targets = (*DEFAULT_LORA_TARGETS, r"unet\..*\.(conv1|conv2)")  # pastel also trains ResNet convs
    cache = AdapterCache(pipe, LoraRegistry(tmp_path, builtin=(TINY_LORA_DIR,)), size=4, max_rank=64, targets=targets, frozen=("unet",))
    engine = StepEngine(pipe, max_rows=4, adapters=cache, controlnets={"canny": canny_net})
    pipe.unet.compile(backend="eager")
    engine.warmup(GenerationRequest(prompt="warm", seed=0, **{**SMALL, "num_inference_steps": 2}).with_defaults(SPEC))
    pastel = (LoraRef(name="pastel"),)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for extra in [{}, {"controlnets": (_control(),)}, {"loras": pastel}, {"loras": pastel, "controlnets": (_control(),)}]:
            (outcome,) = _run(engine, [GenerationRequest(prompt="a red square", seed=1, **SMALL, **extra)])
            assert isinstance(outcome, RunOutput), outcome
