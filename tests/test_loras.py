"""LoRAs in the step engine on the tiny model (fp32 CPU, no Ray): fidelity against plain diffusers'
`load_lora_weights` + `set_adapters`, rows with different LoRA sets in one forward, the slot
cache, kohya and PEFT files, refusals, and no recompile when the sets change."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from configs.app_args import DEFAULT_LORA_TARGETS
from configs.model_spec import TINY_LORA_DIR, TinySpec
from deployments.engine.control import RunOutput
from deployments.engine.lora import AdapterCache
from deployments.engine.loop import StepEngine
from deployments.lora_registry import LoraRegistry, check_name, describe
from deployments.pipelines import load_pipeline, make_scheduler
from deployments.types import GenerationRequest, InvalidRequestError, LoraRef, NotFoundError
from tests import lora_files

ATOL = 1e-4
SPEC = TinySpec(device="cpu")
BASE = dict(prompt="a red circle on a blue background", negative_prompt="blurry", seed=3, width=64, height=64,
            num_inference_steps=4, guidance_scale=5.0, scheduler="euler")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_pipe):
    folder = tmp_path_factory.mktemp("loras")
    lora_files.attention_lora(tiny_pipe, folder / "attn.safetensors")
    lora_files.text_encoder_lora(tiny_pipe, folder / "words.safetensors")
    lora_files.kohya_pastel(folder / "pastel-kohya.safetensors")
    lora_files.wrong_model(folder / "other-model.safetensors")
    return folder


@pytest.fixture(scope="module")
def engine(folder):
    pipe = load_pipeline(SPEC)  # its own: LoRA layers get wrapped
    registry = LoraRegistry(folder, builtin=(TINY_LORA_DIR,))
    return StepEngine(pipe, max_rows=8, adapters=AdapterCache(pipe, registry, size=8, max_rank=64))


@pytest.fixture(scope="module")
def reference(folder, tiny_dir):
    """Plain diffusers with the same files loaded as adapters."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(TINY_LORA_DIR, weight_name="pastel.safetensors", adapter_name="pastel")
    pipe.load_lora_weights(folder, weight_name="attn.safetensors", adapter_name="attn")
    pipe.load_lora_weights(folder, weight_name="words.safetensors", adapter_name="words")

    def image(names: list[str], weights: list[float]) -> np.ndarray:
        pipe.set_adapters(names, weights)
        pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
        return pipe(
            prompt=BASE["prompt"], negative_prompt=BASE["negative_prompt"], width=64, height=64, num_inference_steps=4,
            guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(3), output_type="np",
        ).images[0]

    return image


def _run(engine, *loras_per_request) -> list:
    requests = [GenerationRequest(**BASE, loras=loras).with_defaults(SPEC) for loras in loras_per_request]
    outcomes = engine.generate(requests)
    assert all(isinstance(outcome, RunOutput) for outcome in outcomes), outcomes
    return [outcome.image for outcome in outcomes]


def _lora(name: str, weight: float = 1.0) -> LoraRef:
    return LoraRef(name=name, weight=weight)


@pytest.mark.parametrize(
    "loras, names, weights",
    [
        ((_lora("pastel"),), ["pastel"], [1.0]),
        ((_lora("pastel", 0.7), _lora("attn", 0.5)), ["pastel", "attn"], [0.7, 0.5]),  # a blend
        ((_lora("attn", -0.5),), ["attn"], [-0.5]),  # metadata alpha 8 at rank 4, reversed
        ((_lora("words", 0.8), _lora("pastel")), ["words", "pastel"], [0.8, 1.0]),  # a text-encoder LoRA too
    ],
)
def test_loras_equal_plain_diffusers(engine, reference, loras, names, weights):
    (base,) = _run(engine, ())
    (ours,) = _run(engine, loras)
    expected = reference(names, weights)
    assert np.abs(ours - expected).max() <= ATOL
    assert np.abs(ours - base).max() > 0.05  # the LoRAs really changed the image


def test_the_text_encoder_lora_matters(engine):
    with_words, without = _run(engine, (_lora("words"), _lora("pastel")), (_lora("pastel"),))
    assert np.abs(with_words - without).max() > 0.01


def test_no_lora_or_weight_zero_is_the_base_model_bit_for_bit(engine, tiny_pipe):
    plain = StepEngine(tiny_pipe).generate([GenerationRequest(**BASE).with_defaults(SPEC)])[0].image
    _run(engine, (_lora("pastel"),))  # LoRA layers wrapped and a set resident
    (none,) = _run(engine, ())
    (zero,) = _run(engine, (_lora("pastel", 0.0),))
    assert np.array_equal(none, plain) and np.array_equal(zero, plain)


def test_rows_with_different_sets_share_a_forward_and_keep_their_solo_images(engine):
    sets = [(), (_lora("pastel"),), (_lora("pastel", 0.7), _lora("attn", 0.5)), (_lora("attn"),), (_lora("words"),)]
    alone = [_run(engine, loras)[0] for loras in sets]
    before = engine.stats()["forwards"]
    together = _run(engine, *sets)
    assert engine.stats()["forwards"] - before == 4  # one forward per step for all five rows
    for solo, shared in zip(alone, together):
        assert np.abs(solo - shared).max() <= ATOL


def test_a_name_given_twice_adds_its_weights(engine):
    twice, once = _run(engine, (_lora("pastel", 0.5), _lora("pastel", 0.3)), (_lora("pastel", 0.8),))
    assert np.abs(twice - once).max() <= ATOL


def test_kohya_and_peft_files_of_the_same_weights_give_the_same_image(engine):
    peft, kohya = _run(engine, (_lora("pastel"),), (_lora("pastel-kohya"),))
    assert np.abs(peft - kohya).max() <= ATOL


class _Recorder:
    """An adapter observer that keeps what it heard (the replica turns these into Ray metrics)."""

    def __init__(self):
        self.events = []

    def on_lora_load(self, seconds, resident):
        self.events.append(("load", resident))

    def on_lora_hit(self):
        self.events.append(("hit",))

    def on_lora_evict(self, resident):
        self.events.append(("evict", resident))


def test_evicted_sets_reload_to_the_same_image_and_the_observer_hears_it(folder, tiny_pipe):
    pipe = load_pipeline(SPEC)
    observer = _Recorder()
    cache = AdapterCache(pipe, LoraRegistry(folder, builtin=(TINY_LORA_DIR,)), size=2, max_rank=64, observer=observer)
    engine = StepEngine(pipe, max_rows=2, adapters=cache)
    (first,) = _run(engine, (_lora("pastel"),))
    _run(engine, (_lora("attn"),))
    _run(engine, (_lora("pastel", 0.5),))  # three sets through two slots: pastel goes
    assert cache.stats()["evictions"] == 1 and {"pastel": 1.0} not in cache.stats()["resident_sets"]
    (again,) = _run(engine, (_lora("pastel"),))
    _run(engine, (_lora("pastel"),))
    assert np.array_equal(first, again)
    assert cache.stats()["loads"] == 4 and cache.stats()["hits"] == 1
    assert observer.events == [
        ("load", 1), ("load", 2), ("evict", 1), ("load", 2), ("evict", 1), ("load", 2), ("hit",),
    ]


def test_a_cached_set_is_a_hit_and_reads_no_file(engine, folder):
    _run(engine, (_lora("attn", 0.25),))
    before = engine.stats()["loras"]
    _run(engine, (_lora("attn", 0.25),))
    after = engine.stats()["loras"]
    assert after["hits"] == before["hits"] + 1 and after["loads"] == before["loads"]


@pytest.mark.parametrize(
    "loras, code",
    [
        ((_lora("other-model"),), "lora_model_mismatch"),
        ((_lora("missing"),), "lora_not_found"),
    ],
)
def test_loras_that_cannot_apply_fail_only_their_request(engine, loras, code):
    requests = [GenerationRequest(**BASE, loras=loras).with_defaults(SPEC), GenerationRequest(**BASE).with_defaults(SPEC)]
    bad, good = engine.generate(requests)
    assert isinstance(bad, (InvalidRequestError, NotFoundError)) and bad.code == code
    assert isinstance(good, RunOutput)


def test_a_blend_over_the_rank_limit_is_refused(folder):
    pipe = load_pipeline(SPEC)
    engine = StepEngine(pipe, adapters=AdapterCache(pipe, LoraRegistry(folder, builtin=(TINY_LORA_DIR,)), size=2, max_rank=10))
    (outcome,) = engine.generate([GenerationRequest(**BASE, loras=(_lora("pastel"), _lora("attn"))).with_defaults(SPEC)])
    assert isinstance(outcome, InvalidRequestError) and outcome.code == "lora_rank_too_high" and "12" in outcome.message


SERVED_TARGETS = (*DEFAULT_LORA_TARGETS, r"unet\..*\.(conv1|conv2)")  # the defaults and pastel's ResNet convs


def _compiled_engine(folder, targets=SERVED_TARGETS, warm: bool = True) -> StepEngine:
    """What the factory builds with `optimize.compile`: slots on `targets`, the UNet frozen and
    compiled (dynamo, eager backend on CPU), both graphs warmed up (unless `warm` is False)."""
    pipe = load_pipeline(SPEC)
    cache = AdapterCache(pipe, LoraRegistry(folder, builtin=(TINY_LORA_DIR,)), size=4, max_rank=64, targets=targets, frozen=("unet",))
    engine = StepEngine(pipe, max_rows=4, adapters=cache)
    pipe.unet.compile(backend="eager")
    if warm:
        engine.warmup(GenerationRequest(**BASE).with_defaults(SPEC))
    return engine


def test_changing_sets_does_not_recompile_a_compiled_unet(folder):
    """The adapters reach the model as a slot index tensor, never a Python list of names, and the
    warm-up compiled the adapter graph: no set, first or new, recompiles."""
    engine = _compiled_engine(folder)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for loras in [(_lora("pastel"),), (_lora("attn", 0.3),), (_lora("pastel", 0.6), _lora("attn", 0.2)), (), (_lora("words"),)]:
            _run(engine, loras)
    assert engine.stats()["loras"]["resident"] == 4


def test_a_compiled_unet_refuses_loras_on_layers_without_slots(folder):
    # pastel also trains ResNet convs. The refusal comes at admission, before any forward: the
    # warm-up (two dynamo traces of the UNet) would change nothing here.
    engine = _compiled_engine(folder, targets=DEFAULT_LORA_TARGETS, warm=False)
    (outcome,) = engine.generate([GenerationRequest(**BASE, loras=(_lora("pastel"),)).with_defaults(SPEC)])
    assert isinstance(outcome, InvalidRequestError) and outcome.code == "lora_layer_not_served"
    assert "conv1" in outcome.message and "loras.targets" in outcome.message


def test_fused_qkv_projections_take_q_k_v_loras_exactly(folder, engine):
    """With `optimize.fuse_qkv` the LoRAs of to_q, to_k and to_v land on the fused to_qkv / to_kv."""
    fused_spec = TinySpec(device="cpu", optimize={"fuse_qkv": True})
    pipe = load_pipeline(fused_spec)
    fused = StepEngine(pipe, max_rows=4, adapters=AdapterCache(pipe, LoraRegistry(folder, builtin=(TINY_LORA_DIR,)), size=4, max_rank=64))
    sets = [(_lora("attn"),), (_lora("pastel", 0.8), _lora("attn", 0.4))]
    for loras in sets:
        (expected,) = _run(engine, loras)
        (got,) = _run(fused, loras)
        assert np.abs(expected - got).max() <= ATOL
    assert any(name.endswith("to_qkv") for _, name in fused.adapters.slots.layers)
    assert any(name.endswith("to_kv") for _, name in fused.adapters.slots.layers)


def test_slot_memory_is_set_at_start_and_does_not_grow_with_loads_or_evictions(folder):
    pipe = load_pipeline(SPEC)
    cache = AdapterCache(pipe, LoraRegistry(folder, builtin=(TINY_LORA_DIR,)), size=2, max_rank=16, targets=SERVED_TARGETS)
    engine = StepEngine(pipe, max_rows=2, adapters=cache)
    at_start = cache.stats()["slot_bytes"]
    assert at_start > 0
    for loras in [(_lora("pastel"),), (_lora("attn"),), (_lora("words"),), (_lora("pastel", 0.5),)]:
        _run(engine, loras)
    assert cache.stats()["evictions"] == 2 and cache.stats()["slot_bytes"] == at_start


# --- the registry (file level, no torch) --------------------------------------------------------


@pytest.mark.parametrize("name", ["../etc/passwd", "/abs", "a/b", ".hidden", "", "x" * 65])
def test_names_that_could_leave_the_folder_are_refused(name):
    with pytest.raises(InvalidRequestError) as info:
        check_name(name)
    assert info.value.code == "invalid_lora_name"


@pytest.mark.parametrize("name", ["style.bin", "style.ckpt", "style.pt", "style.pth"])
def test_pickle_names_are_refused(name):
    with pytest.raises(InvalidRequestError) as info:
        check_name(name)
    assert info.value.code == "unsupported_lora_format" and "pickle" in info.value.message


@pytest.mark.parametrize(
    "make, code",
    [
        (lora_files.loha, "unsupported_lora_format"),
        (lora_files.checkpoint, "not_a_lora"),
        (lambda path: path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all") and path, "invalid_lora_file"),
        (lambda path: path.write_bytes(b"abc") and path, "invalid_lora_file"),
    ],
)
def test_files_that_are_not_loras_are_refused_from_their_header(tmp_path, make, code):
    path = tmp_path / "file.safetensors"
    make(path)
    with pytest.raises(InvalidRequestError) as info:
        describe(path, "file", builtin=False)
    assert info.value.code == code


def test_headers_say_format_rank_and_components(folder):
    kohya = describe(folder / "pastel-kohya.safetensors", "pastel-kohya", builtin=False)
    peft = describe(Path(TINY_LORA_DIR) / "pastel.safetensors", "pastel", builtin=True)
    words = describe(folder / "words.safetensors", "words", builtin=False)
    assert (kohya.format, kohya.rank, kohya.components) == ("kohya", 8, ("unet",))
    assert (peft.format, peft.rank, peft.layers) == ("diffusers", 8, kohya.layers)
    assert words.components == ("text_encoder_2",)


def test_two_uploads_of_one_name_publish_once_and_leave_no_staged_file(tmp_path):
    """Publishing links the checked file under its name, which fails if the name exists: of two
    uploads racing for a name, the second gets 409 whenever it lands."""
    import io

    from deployments.types import ConflictError

    registry = LoraRegistry(tmp_path / "uploads")
    data = lora_files.PASTEL.read_bytes()
    first, second = (registry.stage(io.BytesIO(data), limit=len(data)) for _ in range(2))
    registry.publish(first, "ink")
    with pytest.raises(ConflictError) as info:
        registry.publish(second, "ink")
    assert info.value.code == "lora_exists"
    assert sorted(path.name for path in (tmp_path / "uploads").iterdir()) == ["ink.safetensors"]
    assert (tmp_path / "uploads" / "ink.safetensors").read_bytes() == data
