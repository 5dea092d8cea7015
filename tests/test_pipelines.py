"""Model loading from specs: the shipped tiny model through from_pretrained, determinism of the
random builder, the full-size architecture, attention backends."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from safetensors.torch import load_file

from configs.model_spec import (
    MODEL_CONFIG_ROOT,
    TINY_REFINER_DIR,
    PretrainedRefinerSpec,
    PretrainedSpec,
    TinyRefinerSpec,
    TinySpec,
)
from deployments.pipelines import (
    build_random_pipeline,
    build_random_refiner,
    byte_level_tokenizer,
    load_pipeline,
    load_refiner,
    set_attention_backend,
)


def _state(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_tiny_is_saved_in_diffusers_layout(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert list((tiny_dir / part).glob("*.safetensors")), part
    assert (tiny_dir / "tokenizer").is_dir() and (tiny_dir / "tokenizer_2").is_dir()


def test_tiny_loads_the_shipped_weights_not_a_random_init(tiny_pipe):
    """Every parameter of the architecture comes from the shipped files, and each component is
    trained: its weights moved away from the seeded random start of training. (Not all of them:
    SDXL reads the first text encoder's penultimate layer, so its last layer never trains.)"""
    built = build_random_pipeline(MODEL_CONFIG_ROOT / "tiny", 0, torch.device("cpu"), torch.float32)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        loaded, fresh = _state(getattr(tiny_pipe, part)), _state(getattr(built, part))
        assert loaded.keys() == fresh.keys()
        moved = sum(not torch.equal(loaded[k], fresh[k]) for k in loaded)
        assert moved >= len(loaded) // 2, part


def test_pretrained_spec_loads_a_local_diffusers_folder(tiny_dir, tiny_pipe):
    """The real-weights path (`source: pretrained`) on a folder the project saved itself."""
    pipe = load_pipeline(PretrainedSpec(source="pretrained", path=str(tiny_dir), local_files_only=True, device="cpu"))
    assert isinstance(pipe, StableDiffusionXLPipeline)
    args = dict(prompt="a red circle", width=64, height=64, num_inference_steps=2, output_type="np")
    ours = pipe(generator=torch.Generator().manual_seed(1), **args).images
    expected = tiny_pipe(generator=torch.Generator().manual_seed(1), **args).images
    assert np.abs(ours - expected).max() <= 1e-6


def test_pretrained_spec_with_separate_vae(tiny_dir):
    pipe = load_pipeline(
        PretrainedSpec(
            source="pretrained", path=str(tiny_dir), vae_path=str(tiny_dir / "vae"), local_files_only=True, device="cpu"
        )
    )
    assert pipe.vae.config.latent_channels == 4


def test_tiny_build_is_deterministic_and_seed_dependent():
    a = build_random_pipeline(MODEL_CONFIG_ROOT / "tiny", 0, torch.device("cpu"), torch.float32)
    b = build_random_pipeline(MODEL_CONFIG_ROOT / "tiny", 0, torch.device("cpu"), torch.float32)
    c = build_random_pipeline(MODEL_CONFIG_ROOT / "tiny", 1, torch.device("cpu"), torch.float32)
    weight = "conv_in.weight"
    assert torch.equal(a.unet.state_dict()[weight], b.unet.state_dict()[weight])
    assert not torch.equal(a.unet.state_dict()[weight], c.unet.state_dict()[weight])


def test_sdxl_arch_has_the_public_parameter_counts():
    """Built on the meta device: the full-size architecture costs no memory to check."""
    pipe = build_random_pipeline(MODEL_CONFIG_ROOT / "sdxl-arch", 0, torch.device("meta"), torch.float16)
    counts = {part: sum(p.numel() for p in getattr(pipe, part).parameters()) for part in ("unet", "vae", "text_encoder", "text_encoder_2")}
    assert counts == {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}
    assert pipe.unet.dtype == torch.float16


def test_sdxl_arch_refiner_has_the_public_refiner_unet():
    """The public refiner: a 2.26 B UNet on the second text encoder only (1280 wide) with the
    aesthetic score among its time ids; VAE and second text encoder as the base's."""
    pipe = build_random_refiner(MODEL_CONFIG_ROOT / "sdxl-arch-refiner", MODEL_CONFIG_ROOT / "sdxl-arch", 0, torch.device("meta"), torch.float16)
    assert sum(p.numel() for p in pipe.unet.parameters()) == 2_259_526_660
    assert pipe.unet.config.cross_attention_dim == 1280 and pipe.unet.config.projection_class_embeddings_input_dim == 2560
    assert pipe.config.requires_aesthetics_score and pipe.text_encoder is None and pipe.unet.dtype == torch.float16


def test_the_tiny_refiner_loads_its_weights_and_shares_the_base_components(tiny_pipe, tmp_path):
    """`source: tiny` reads the shipped UNet and takes the base's VAE and second text encoder;
    the same refiner saved whole loads through the real-weights path (`source: pretrained`)."""
    refiner = load_refiner(TinyRefinerSpec(), TinySpec(device="cpu"))
    shipped = load_file(TINY_REFINER_DIR / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(refiner.unet.state_dict()[name], weight) for name, weight in shipped.items())
    for part in ("vae", "text_encoder_2"):
        ours, base = getattr(refiner, part).state_dict(), getattr(tiny_pipe, part).state_dict()
        assert all(torch.equal(ours[name], base[name]) for name in base)
    refiner.save_pretrained(tmp_path)
    whole = load_refiner(PretrainedRefinerSpec(source="pretrained", path=str(tmp_path), local_files_only=True), TinySpec(device="cpu"))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    args = dict(prompt="a red circle", image=latents, num_inference_steps=4, denoising_start=0.5, output_type="np")
    ours = whole(generator=torch.Generator().manual_seed(1), **args).images
    expected = refiner(generator=torch.Generator().manual_seed(1), **args).images
    assert np.abs(ours - expected).max() <= 1e-6


def test_byte_level_tokenizer_round_trips_text():
    tokenizer = byte_level_tokenizer()
    ids = tokenizer("a red circle, top left").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert max(ids) == tokenizer.eos_token_id  # CLIP pools at argmax(ids): the end token
    assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == "aredcircle,topleft"


def test_attention_backend_on_cpu(tiny_pipe):
    assert set_attention_backend(tiny_pipe, "auto", torch.device("cpu")) == "sdpa"
    assert set_attention_backend(tiny_pipe, "sdpa", torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="xformers"):
        set_attention_backend(tiny_pipe, "xformers", torch.device("cpu"))


def test_auto_attention_on_a_gpu_with_xformers(tiny_pipe, monkeypatch):
    """On CUDA with xformers importable, `auto` takes it, except with fused projections (their
    processor is SDPA's and would replace xformers' unseen)."""
    import deployments.pipelines as pipelines

    switched = []
    monkeypatch.setattr(pipelines, "_xformers_importable", lambda: True)
    monkeypatch.setattr(tiny_pipe, "enable_xformers_memory_efficient_attention", lambda: switched.append(True))
    cuda = torch.device("cuda")
    assert set_attention_backend(tiny_pipe, "auto", cuda, fused_qkv=True) == "sdpa" and not switched
    assert set_attention_backend(tiny_pipe, "auto", cuda) == "xformers" and switched == [True]


def test_xformers_with_fused_projections_is_refused():
    with pytest.raises(ValueError, match="fuse_qkv"):
        TinySpec(attention="xformers", optimize={"fuse_qkv": True})


def test_dtype_and_device_resolution():
    from deployments.pipelines import resolve_device, resolve_dtype

    spec = TinySpec(device="cpu")
    assert resolve_device(spec) == torch.device("cpu")
    assert resolve_dtype(spec, torch.device("cpu")) == torch.float32
    assert resolve_dtype(spec, torch.device("cuda")) == torch.float16
    assert resolve_dtype(TinySpec(dtype="bfloat16"), torch.device("cpu")) == torch.bfloat16


def test_a_guidance_distilled_unet_is_refused_at_load(tiny_pipe):
    """A UNet with a guidance embedding (the full LCM-SDXL UNet) would draw wrongly without an
    error: the engine never passes `timestep_cond`. It is refused, naming the setting."""
    from deployments.pipelines import check_served_unet

    check_served_unet(tiny_pipe.unet.config)  # the served UNet has none
    with pytest.raises(ValueError, match=r"time_cond_proj_dim=256.*LCM-LoRA"):
        check_served_unet({**tiny_pipe.unet.config, "time_cond_proj_dim": 256})
