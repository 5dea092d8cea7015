"""Deep-feature caching (`deep_cache_interval`, DeepCache) on the tiny model, fp32 CPU, no Ray.

The two passes equal the UNet: the full pass's prediction is the UNet's own (with ControlNet
residuals too), and a shallow pass on the deep features of the same inputs gives it again, so the
only approximation left is reusing an earlier step's features. A row caching deep features equals
plain diffusers whose UNet runs that schedule (full every N-th call, shallow between), for several
schedulers and with guidance ending early; it equals itself alone when it shares forwards with
plain rows and other caching rows that joined at other steps; the image keeps the prompt's colours
and shapes; the UNet runs the shallow branch on the steps between; what cannot apply is refused
naming the field.
"""

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLPipeline
from pydantic import ValidationError

from configs.model_spec import TINY_CONTROLNET_CANNY_DIR, TINY_LORA_DIR, TinySpec
from deployments.engine.control import RunOutput
from deployments.engine.deep_cache import DeepCacheUNet
from deployments.engine.lora import AdapterCache
from deployments.engine.loop import StepEngine
from deployments.lora_registry import LoraRegistry
from deployments.pipelines import load_pipeline
from deployments.types import ControlRef, GenerationRequest, InvalidRequestError, LoraRef, RefinerSettings
from tests.test_engine import _reference_image
from training import evaluate, shapes

FIDELITY_ATOL = 1e-4
SPEC = TinySpec(device="cpu")
SMALL = dict(width=64, height=64, num_inference_steps=10, guidance_scale=5.0, scheduler="euler")


@pytest.fixture(scope="module")
def engine(tiny_pipe):
    return StepEngine(tiny_pipe, max_rows=8, deep_cache=DeepCacheUNet(tiny_pipe.unet))


def _resolved(**fields) -> GenerationRequest:
    return GenerationRequest(**{"prompt": "a red circle on a blue background", **SMALL, **fields}).with_defaults(SPEC)


def _pixels(outcome) -> np.ndarray:
    assert isinstance(outcome, RunOutput), outcome
    return outcome.image


def _unet_inputs(unet, rows: int, side: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(rows, unet.config.in_channels, side, side, generator=generator)
    timestep = torch.tensor([700.0, 700.0, 300.0, 300.0][:rows])
    prompt = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=generator)
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(rows, pooled, generator=generator), "time_ids": torch.randn(rows, 6, generator=generator)}
    return sample, timestep, prompt, added


# -- the passes --------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [8, 10])  # 10: not a multiple of the up blocks' factor (upsample sizes passed)
def test_the_full_pass_is_the_unet_and_the_shallow_pass_on_its_features_too(tiny_pipe, side):
    unet, passes = tiny_pipe.unet, DeepCacheUNet(tiny_pipe.unet)
    sample, timestep, prompt, added = _unet_inputs(unet, 4, side)
    with torch.inference_mode():
        expected = unet(sample, timestep, encoder_hidden_states=prompt, added_cond_kwargs=added, return_dict=False)[0]
        full, deep = passes.full(sample, timestep, prompt, added)
        shallow = passes.shallow(sample, timestep, prompt, added, deep)
    assert deep.shape[-2:] == sample.shape[-2:]  # what enters the final up block: full resolution
    assert torch.equal(full, expected)
    assert torch.equal(shallow, expected)


def test_the_full_pass_adds_controlnet_residuals_as_the_unet_does(tiny_pipe):
    unet, passes = tiny_pipe.unet, DeepCacheUNet(tiny_pipe.unet)
    controlnet = ControlNetModel.from_pretrained(TINY_CONTROLNET_CANNY_DIR)
    sample, timestep, prompt, added = _unet_inputs(unet, 2, 8)
    with torch.inference_mode():
        down, mid = controlnet(
            sample, timestep, encoder_hidden_states=prompt, controlnet_cond=torch.rand(2, 3, 64, 64),
            added_cond_kwargs=added, return_dict=False,
        )
        control = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        expected = unet(sample, timestep, encoder_hidden_states=prompt, added_cond_kwargs=added, return_dict=False, **control)[0]
        plain = unet(sample, timestep, encoder_hidden_states=prompt, added_cond_kwargs=added, return_dict=False)[0]
        full, _ = passes.full(sample, timestep, prompt, added, **control)
    assert torch.equal(full, expected)
    assert not torch.allclose(expected, plain)  # the residuals mattered


def test_unets_of_other_kinds_are_refused(tiny_pipe):
    class OtherConfig(dict):
        __getattr__ = dict.get

    class Other:
        config = OtherConfig(class_embed_type="timestep", center_input_sample=False, addition_embed_type="text_time")

    with pytest.raises(ValueError, match="class_embed_type"):
        DeepCacheUNet(Other())


# -- rows against plain diffusers ----------------------------------------------------------------------


class _ScheduledUNet(torch.nn.Module):
    """The reference: a UNet for diffusers' own denoising loop that runs the full pass on every
    `interval`-th call and the shallow pass on the features it kept between (one call a step)."""

    def __init__(self, unet, interval: int):
        super().__init__()
        self.inner, self.interval, self.calls, self.deep = unet, interval, 0, None
        self.passes = DeepCacheUNet(unet)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, return_dict=False, **_):
        timestep = timestep.reshape(1).expand(sample.shape[0])
        if self.calls % self.interval == 0:
            noise, self.deep = self.passes.full(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        else:  # guidance may have ended since the full step: its conditional (last) rows
            noise = self.passes.shallow(sample, timestep, encoder_hidden_states, added_cond_kwargs, self.deep[-sample.shape[0]:])
        self.calls += 1
        return (noise,)


def _reference(tiny_pipe, request: GenerationRequest) -> np.ndarray:
    components = {**tiny_pipe.components, "unet": _ScheduledUNet(tiny_pipe.unet, request.deep_cache_interval)}
    pipe = StableDiffusionXLPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = tiny_pipe.scheduler.config
    return _reference_image(pipe, request)


@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_a_caching_row_matches_diffusers_running_the_same_schedule(tiny_pipe, engine, interval, scheduler):
    request = _resolved(deep_cache_interval=interval, scheduler=scheduler, seed=4)
    (outcome,) = engine.generate([request])
    expected = _reference(tiny_pipe, request)
    assert np.abs(_pixels(outcome) - expected).max() <= FIDELITY_ATOL


def test_plain_rows_on_a_deep_cache_engine_draw_the_ordinary_image(tiny_pipe, engine):
    """Its full forwards are the full pass (the UNet's prediction plus the deep features)."""
    request = _resolved(seed=6)
    before = engine.stats()["shallow_unet_calls"]
    (outcome,) = engine.generate([request])
    assert engine.stats()["shallow_unet_calls"] == before
    (ordinary,) = StepEngine(tiny_pipe).generate([request])
    assert np.abs(_pixels(outcome) - _pixels(ordinary)).max() <= FIDELITY_ATOL


def test_caching_changes_the_image_by_little_and_runs_shallow_steps(engine):
    """At the model's size and 30 steps (adjacent steps' features are closer the more steps there
    are: at 10 steps the same interval moved images 4-10× further, README "Deep-feature caching")."""
    settings = dict(num_inference_steps=30, width=None, height=None, seed=5)
    plain = _pixels(engine.generate([_resolved(**settings)])[0])
    before = engine.stats()["shallow_unet_calls"]
    cached = _pixels(engine.generate([_resolved(deep_cache_interval=3, **settings)])[0])
    # Full UNet at steps 0, 3, …, 27: twenty shallow calls (one row, unbatched).
    assert engine.stats()["shallow_unet_calls"] - before == 20
    difference = np.abs(cached - plain).mean()
    assert 0 < difference < 0.01  # an approximation, a small one here: measured 0.0025 (mean of |Δ| in [0, 1])


def test_a_caching_row_sharing_forwards_equals_it_alone(engine):
    """Caching rows of two intervals and a plain row, the second caching row and the plain one
    joining the running batch at steps 1 and 2: each equals its image alone."""
    requests = [
        _resolved(deep_cache_interval=3, seed=11),
        _resolved(deep_cache_interval=2, seed=12, scheduler="dpmpp_2m", guidance_end=0.5),
        _resolved(seed=13, num_inference_steps=7),
    ]
    alone = [_pixels(engine.generate([request])[0]) for request in requests]
    controls = [engine.submit(requests[0])]
    for request in requests[1:]:
        engine.step()
        controls.append(engine.submit(request))
    engine.run_until_idle()
    for control, expected in zip(controls, alone):
        assert np.abs(_pixels(control.outcome) - expected).max() <= FIDELITY_ATOL


def test_a_caching_request_joins_where_the_running_rows_take_a_full_step(tiny_pipe, engine):
    """A request at interval 3 sent while a row of its size and interval is at its step 1 waits
    two steps and joins at that row's step 3 (both then take full steps together), and its image
    is its image alone; a plain request joins at once."""
    aligned = StepEngine(tiny_pipe, max_rows=8, deep_cache=DeepCacheUNet(tiny_pipe.unet))
    first, second = _resolved(deep_cache_interval=3, seed=21), _resolved(deep_cache_interval=3, seed=22)
    controls = [aligned.submit(first)]
    aligned.step()
    controls.append(aligned.submit(second))
    plain = aligned.submit(_resolved(seed=23, num_inference_steps=4))
    aligned.step()  # the plain one joins; the caching one waits (the first row's step 1)
    assert aligned.stats()["admitted"] == 2 and aligned.stats()["waiting"] == 1
    aligned.step()  # step 2: still out of phase
    assert aligned.stats()["admitted"] == 2
    aligned.step()  # step 3, a full step of the first row: it joins
    assert aligned.stats()["admitted"] == 3 and aligned.stats()["phase_waits"] == 2
    aligned.run_until_idle()
    assert isinstance(plain.outcome, RunOutput)
    for control, request in zip(controls, (first, second)):
        assert np.abs(_pixels(control.outcome) - _pixels(engine.generate([request])[0])).max() <= FIDELITY_ATOL


def test_every_kind_and_a_lora_row_cache_and_each_equals_it_alone(tiny_dir, tmp_path):
    """img2img, inpaint (with blur and a crop) and a LoRA row, each caching at interval 2 or 3,
    one batch: each row's shallow steps run with its own latents, mask blend and LoRA slot, and
    each image equals its image alone."""
    pipe = load_pipeline(SPEC)  # its own: LoRA slot layers get wrapped
    adapters = AdapterCache(pipe, LoraRegistry(tmp_path, builtin=(TINY_LORA_DIR,)), size=2, max_rank=64)
    lora_engine = StepEngine(pipe, max_rows=8, adapters=adapters, deep_cache=DeepCacheUNet(pipe.unet))
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 20:44] = 255
    requests = [
        _resolved(kind="img2img", init_image=picture, strength=0.7, deep_cache_interval=2, seed=21),
        _resolved(kind="inpaint", init_image=picture, mask_image=mask, strength=0.9, mask_blur=2, padding_mask_crop=8,
                  deep_cache_interval=3, seed=22, width=None, height=None),
        _resolved(loras=(LoraRef(name="pastel", weight=0.8),), deep_cache_interval=3, seed=23),
        _resolved(seed=24),
    ]
    alone = [_pixels(lora_engine.generate([request])[0]) for request in requests]
    together = lora_engine.generate(requests)
    assert lora_engine.stats()["shallow_unet_calls"] > 0
    for outcome, expected in zip(together, alone):
        assert np.abs(_pixels(outcome) - expected).max() <= FIDELITY_ATOL


def test_buckets_pad_a_caching_row_without_changing_it(tiny_pipe, engine):
    """A call of 8 UNet rows only (bucket 4 images): every full and shallow call is padded."""
    requests = [_resolved(deep_cache_interval=3, seed=14), _resolved(seed=15), _resolved(deep_cache_interval=2, seed=16)]
    padded = StepEngine(tiny_pipe, max_rows=8, buckets=[4], deep_cache=DeepCacheUNet(tiny_pipe.unet))
    outcomes = padded.generate(requests)
    assert padded.stats()["padded_unet_rows"] > 0 and padded.stats()["shallow_unet_calls"] > 0
    for outcome, request in zip(outcomes, requests):
        assert np.abs(_pixels(outcome) - _pixels(engine.generate([request])[0])).max() <= FIDELITY_ATOL


def test_shallow_calls_do_not_price_their_bucket(tiny_pipe):
    """A shallow call costs less than a full pass of the same size, which the warm-up priced:
    only served full passes re-price the bucket."""
    padded = StepEngine(tiny_pipe, max_rows=8, buckets=[4], deep_cache=DeepCacheUNet(tiny_pipe.unet))
    padded.time_buckets(_resolved(deep_cache_interval=3))
    before = padded.stats()
    padded.generate([_resolved(deep_cache_interval=3, seed=17)])
    after = padded.stats()
    calls, shallow = (after[name] - before[name] for name in ("unet_calls", "shallow_unet_calls"))
    assert shallow > 0 and after["unet_calls_priced"] == {8: calls - shallow}


def test_the_image_keeps_the_prompts_colours_and_shapes(engine):
    scene = evaluate.held_out_scenes(16, seed=1234)
    requests = [
        GenerationRequest(prompt=shapes.caption(scene, i), seed=i, deep_cache_interval=3, num_inference_steps=30).with_defaults(SPEC)
        for i in range(len(scene))
    ]
    images = torch.from_numpy(np.stack([_pixels(outcome) for outcome in engine.generate(requests)])).permute(0, 3, 1, 2)
    scores = evaluate.text_to_image(None, scene, images)
    # Measured 1.0 / 1.0 / 0.94 / 0.62 (plain, 30 steps: 1.0 / 1.0 / 0.94 / 0.69); chance 0.1, 0.1, 0.25, 0.11.
    assert scores["foreground"] >= 0.9 and scores["background"] >= 0.9
    assert scores["shape"] >= 0.6 and scores["position"] >= 0.5


# -- what is refused --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 11, 2.5])
def test_out_of_range_intervals_are_refused(value):
    with pytest.raises(ValidationError, match="deep_cache_interval"):
        GenerationRequest(prompt="x", deep_cache_interval=value)


def test_controlnet_and_refiner_are_refused_naming_the_field():
    blank = np.zeros((64, 64, 3), dtype=np.uint8)
    for extra in ({"controlnets": (ControlRef(name="canny", image=blank),)}, {"refiner": RefinerSettings()}):
        with pytest.raises(InvalidRequestError) as refused:
            _resolved(deep_cache_interval=2, **extra)
        assert refused.value.param == "deep_cache_interval" and refused.value.status_code == 400


def test_an_engine_without_deep_cache_refuses_the_request(tiny_pipe):
    with pytest.raises(InvalidRequestError) as refused:
        StepEngine(tiny_pipe).submit(_resolved(deep_cache_interval=2))
    assert refused.value.param == "deep_cache_interval" and refused.value.code == "deep_cache_disabled"
