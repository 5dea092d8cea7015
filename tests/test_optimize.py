"""Every speed switch's code path on the tiny model (CPU): each keeps the image (within the
tolerance its arithmetic allows) or fails with a clear message where it cannot run."""

import os

import numpy as np
import pytest

from configs.model_spec import OptimizeConfig, TinySpec
from deployments.engine.loop import StepEngine
from deployments.pipelines import load_pipeline
from deployments.types import GenerationRequest

REQUEST = GenerationRequest(prompt="a red circle", negative_prompt="blur", seed=3, width=64, height=64,
                            num_inference_steps=3, guidance_scale=5.0, scheduler="euler", deep_cache_interval=1)


def _image(spec: TinySpec) -> np.ndarray:
    (outcome,) = StepEngine(load_pipeline(spec), buckets=spec.optimize.buckets()).generate([REQUEST])
    return outcome.image


@pytest.fixture(scope="module")
def baseline(tiny_spec) -> np.ndarray:
    return _image(tiny_spec)


def _with(tiny_spec, **switches) -> TinySpec:
    return tiny_spec.model_copy(update={"optimize": OptimizeConfig(**switches)})


@pytest.mark.parametrize(
    "switches",
    [{"channels_last": True}, {"fuse_qkv": True}, {"vae_slicing": True}, {"channels_last": True, "fuse_qkv": True}],
)
def test_exact_switches_keep_the_image(tiny_spec, baseline, switches):
    assert np.abs(_image(_with(tiny_spec, **switches)) - baseline).max() <= 1e-4


def test_compile_path_with_cache_dir(tiny_spec, baseline, tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    spec = _with(tiny_spec, compile="unet+vae", compile_backend="eager", compile_cache_dir=str(tmp_path / "cc"))
    pipe = load_pipeline(spec)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cc")
    assert pipe.unet._compiled_call_impl is not None and pipe.vae.decoder._compiled_call_impl is not None
    (outcome,) = StepEngine(pipe, buckets=spec.optimize.buckets()).generate([REQUEST])
    assert np.abs(outcome.image - baseline).max() <= 1e-4
    assert spec.optimize.buckets() == [1, 2, 4, 8]
    assert _with(tiny_spec, compile="unet", compile_dynamic=True).optimize.buckets() is None


def test_regional_compile_compiles_each_transformer_block_and_keeps_the_image(tiny_spec, baseline):
    spec = _with(tiny_spec, compile="unet", compile_scope="regional", compile_backend="eager")
    pipe = load_pipeline(spec)
    blocks = [m for m in pipe.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks)
    assert pipe.unet._compiled_call_impl is None  # the rest of the UNet runs eager
    (outcome,) = StepEngine(pipe, buckets=spec.optimize.buckets()).generate([REQUEST])
    assert np.abs(outcome.image - baseline).max() <= 1e-4


def test_block_compile_warms_every_block_within_dynamo_limit_and_keeps_the_image(tiny_spec, baseline):
    """`compile_scope: blocks` compiles each transformer block, ResNet block and sampler of the
    UNet and (with `unet+vae`) the VAE decoder, fullgraph, and nothing whole. Those graphs sit on
    a few shared `forward`s, a ResNet's once per instance and shape: with dynamo's limit at 4 and
    hitting it an error, the factory's warm-up makes room for them, and a request afterwards
    neither recompiles nor moves the image."""
    import torch

    from configs.app_args import BatchingConfig
    from deployments.engine.factory import EngineFactory
    from deployments.optimize import BLOCK_CLASSES

    torch._dynamo.reset()  # graphs earlier tests left on the same forwards count towards the limit
    spec = _with(tiny_spec, compile="unet+vae", compile_scope="blocks", compile_backend="eager", batch_buckets=[1, 2])
    spec = spec.model_copy(update={"default_size": (REQUEST.width, REQUEST.height)})  # the size the warm-up compiles
    with torch._dynamo.config.patch(recompile_limit=4, fail_on_recompile_limit_hit=True):
        engine = EngineFactory(
            spec.model_dump(mode="json"), BatchingConfig(max_batch_size=2).model_dump(mode="json"), pipeline_factory=load_pipeline
        )(None)
        pipe = engine._pipe
        for model in (pipe.unet, pipe.vae.decoder):
            blocks = [m for m in model.modules() if type(m).__name__ in BLOCK_CLASSES]
            assert blocks and all(block._compiled_call_impl is not None for block in blocks)
            assert model._compiled_call_impl is None
        assert {type(m).__name__ for m in pipe.unet.modules() if m._compiled_call_impl is not None} == set(BLOCK_CLASSES)
        with torch._dynamo.config.patch(error_on_recompile=True):
            (outcome,) = engine.generate([REQUEST.with_defaults(spec)])
    assert np.abs(outcome.image - baseline).max() <= 1e-4


@pytest.mark.parametrize(
    "setting",
    [
        {"compile_scope": "regional"},
        {"compile_scope": "blocks"},
        {"warmup_sizes": [[256, 256]]},
        {"unguided_bucket": True},
        # A dynamic graph runs any batch size: without batch_buckets there is no bucket to add.
        {"unguided_bucket": True, "compile": "unet", "compile_dynamic": True},
        # An eager UNet with buckets was served one image at a time (nothing timed the buckets,
        # so every group split into one-image calls).
        {"batch_buckets": [1, 8]},
        {"profile_warmup": True},
    ],
)
def test_compile_settings_without_compile_are_refused(setting):
    """Each is refused naming the field and what it needs, and the same setting with a static
    compile and buckets is accepted (so the refusal is about compile, not the value)."""
    field = next(iter(setting))
    with pytest.raises(ValueError, match=rf"{field}.* needs compile 'unet' or 'unet\+vae'"):
        OptimizeConfig(**setting)
    OptimizeConfig(**{"batch_buckets": [1, 8], **setting, "compile": "unet", "compile_dynamic": False})


def test_buckets_apply_to_a_compiled_unet_only():
    assert OptimizeConfig(compile="unet", batch_buckets=[1, 8]).buckets() == [1, 8]
    assert OptimizeConfig().buckets() is None  # eager: each group at its own size


def test_bad_warmup_sizes_are_refused():
    with pytest.raises(ValueError, match=r"warmup_sizes entry \[1020, 1024\]"):
        OptimizeConfig(compile="unet", warmup_sizes=[[1020, 1024]])


def test_bfloat16_stays_close(tiny_spec, baseline):
    image = _image(tiny_spec.model_copy(update={"dtype": "bfloat16"}))
    mse = float(np.mean((image - baseline) ** 2))
    assert image.dtype == np.float32 and 10 * np.log10(1.0 / max(mse, 1e-12)) > 20


def test_fp8_refuses_a_cpu(tiny_spec):
    with pytest.raises(ValueError, match="fp8"):
        load_pipeline(_with(tiny_spec, fp8=True))


def test_fp8_quantizes_the_fused_projections(tiny_spec, monkeypatch):
    """Fusing after float8 would concatenate float8 weights, which torchao refuses (seen on an
    H100): the projections are fused first and float8 sees the fused layers."""
    import deployments.optimize as optimize

    seen = []
    monkeypatch.setattr(
        optimize, "_float8", lambda pipe, device: seen.append(any(getattr(m, "fused_projections", False) for m in pipe.unet.modules()))
    )
    load_pipeline(_with(tiny_spec, fp8=True, fuse_qkv=True))
    assert seen == [True]


def test_bad_buckets_are_rejected():
    with pytest.raises(ValueError, match="batch_buckets"):
        OptimizeConfig(batch_buckets=[4, 2])


@pytest.mark.parametrize("scope", ["full", "regional"])
def test_deep_cache_passes_compile_with_the_unet_and_keep_the_image(tiny_spec, scope):
    """`deep_cache` under `compile`: the factory compiles both passes as the UNet is (whole
    graphs under `full`; under `regional` the passes stay eager and call the UNet's compiled
    transformer blocks) and the warm-up runs them (every full step is the full pass; a
    deep-cache request's second step the shallow one); a request then draws what an eager engine
    draws."""
    from deployments.engine.deep_cache import DeepCacheUNet
    from deployments.engine.factory import EngineFactory

    spec = _with(tiny_spec, compile="unet", compile_scope=scope, compile_backend="eager", batch_buckets=[1], deep_cache=True)
    engine = EngineFactory(model_spec=spec.model_dump(mode="json"), batching={"max_batch_size": 2})()
    passes = (engine.deep_cache._full, engine.deep_cache._shallow)
    assert all(hasattr(step, "_torchdynamo_orig_callable") == (scope == "full") for step in passes)
    blocks = [module for module in engine.deep_cache.unet.modules() if type(module).__name__ == "BasicTransformerBlock"]
    assert blocks and all(block._compiled_call_impl is not None for block in blocks) == (scope == "regional")
    request = REQUEST.model_copy(update={"deep_cache_interval": 2})
    (compiled,) = engine.generate([request])
    eager_pipe = load_pipeline(tiny_spec)
    (eager,) = StepEngine(eager_pipe, deep_cache=DeepCacheUNet(eager_pipe.unet)).generate([request])
    assert engine.stats()["shallow_unet_calls"] == 1
    assert np.abs(compiled.image - eager.image).max() <= 1e-4


def test_profile_warmup_summarises_one_call_per_bucket(tiny_spec):
    """`profile_warmup`: the replica's start info holds, per UNet bucket (in rows), one profiled
    call's wall seconds and the host ops (on a GPU also the kernels) that took longest — the
    UNet's convolutions among them — to compare a replica's calls with a plain process's."""
    from deployments.engine.factory import EngineFactory

    spec = _with(tiny_spec, compile="unet", compile_backend="eager", batch_buckets=[1, 2], profile_warmup=True)
    engine = EngineFactory(spec.model_dump(mode="json"), {"max_batch_size": 2})()
    profile = engine.startup["profile"]
    assert sorted(profile) == [2, 4]  # UNet rows of one and two guided images
    for call in profile.values():
        assert call["wall_s"] > 0 and call["device_s"] == 0 and call["kernels"] == []  # no device here
        assert 0 < len(call["host_ops"]) <= 25
        assert any("convolution" in op["name"] and op["calls"] > 0 for op in call["host_ops"])
    unprofiled = EngineFactory(_with(tiny_spec, compile="unet", compile_backend="eager", batch_buckets=[1]).model_dump(mode="json"), {"max_batch_size": 1})()
    assert "profile" not in unprofiled.startup


def test_the_engine_thread_compiles_a_size_the_warm_up_did_not_run(tiny_spec):
    """In torch 2.13 dynamo's settings live in a ContextVar, so each thread has its own: the
    `recompile_limit` a warm-up raises to hold its graphs is not raised on a replica's engine
    thread, which starts from the default (8). Warmed with 12 graphs per block (UNet calls of 1, 2
    and 4 rows × the plain and deep-cache passes × two sizes) and then serving on its own thread as
    `EngineReplica` runs it, the engine must still compile a request at a size the warm-up did not
    run; with the default limit that thread had no room and the request failed."""
    import threading

    import torch

    from configs.app_args import BatchingConfig
    from deployments.engine.control import RunOutput
    from deployments.engine.factory import EngineFactory

    torch._dynamo.reset()  # graphs earlier tests left on the same forwards count towards the limit
    spec = _with(
        tiny_spec, compile="unet", compile_scope="regional", compile_backend="eager", batch_buckets=[1, 2],
        unguided_bucket=True, deep_cache=True, warmup_sizes=[[72, 64]],
    )
    spec = spec.model_copy(update={"default_size": (64, 64)})
    engine = EngineFactory(spec.model_dump(mode="json"), BatchingConfig(max_batch_size=2).model_dump(mode="json"))(None)
    stop = threading.Event()
    thread = threading.Thread(target=engine.run, args=(stop,), name="step-engine", daemon=True)
    thread.start()
    try:
        unwarmed = REQUEST.model_copy(update={"width": 96}).with_defaults(spec)
        outcome = engine.submit(unwarmed).wait(timeout=120)
    finally:
        stop.set()
        thread.join()
    assert isinstance(outcome, RunOutput), outcome
    assert outcome.image.shape == (64, 96, 3)
