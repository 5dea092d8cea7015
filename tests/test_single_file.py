"""Loading SDXL from one original-format checkpoint (`from_single_file`), offline.

The tiny pipeline is exported with `tests/ldm_export.py` and loaded back through diffusers' own
single-file converters; weights must come back bit-identical and images must match.
"""

import shutil
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.loaders import single_file_utils
from safetensors import safe_open

from configs.model_spec import MODEL_CONFIG_ROOT, SingleFileSpec
from deployments.pipelines import build_random_pipeline, load_pipeline
from tests.ldm_export import (
    CLIP_L_PREFIX,
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    save_sdxl_single_file,
    sdxl_ldm_state_dict,
    separate_text_encoders,
)

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module", autouse=True)
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        # huggingface_hub reads the variable once, at import; set what it read as well.
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def tiny_folder(tiny_dir) -> Path:
    return tiny_dir


@pytest.fixture(scope="module")
def config_folder(tiny_folder, tmp_path_factory) -> Path:
    """The tiny folder without its weight files.

    When diffusers finds no weights for a component in the checkpoint it falls back to the config
    folder's own weights; without them here, every weight must come from the single file.
    """
    target = tmp_path_factory.mktemp("config") / "tiny"
    shutil.copytree(tiny_folder, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return target


@pytest.fixture(scope="module")
def reference(tiny_folder) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def checkpoint(reference, tmp_path_factory) -> Path:
    return save_sdxl_single_file(reference, tmp_path_factory.mktemp("ckpt") / "tiny-sdxl.safetensors")


@pytest.fixture(scope="module")
def from_file(checkpoint, config_folder) -> StableDiffusionXLPipeline:
    with separate_text_encoders():
        pipe = StableDiffusionXLPipeline.from_single_file(
            str(checkpoint), config=str(config_folder), local_files_only=True
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> np.ndarray:
    return pipe(
        "a lighthouse at dusk",
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator("cpu").manual_seed(1234),
        output_type="np",
    ).images


def test_checkpoint_uses_original_key_layout(checkpoint):
    prefixes = (UNET_PREFIX, VAE_PREFIX, CLIP_L_PREFIX, OPEN_CLIP_PREFIX)
    with safe_open(str(checkpoint), "pt") as f:
        used = {next((p for p in prefixes if key.startswith(p)), key) for key in f.keys()}
    assert used == set(prefixes)  # all four parts, nothing under a diffusers name


@pytest.mark.parametrize("component", COMPONENTS)
def test_weights_round_trip_exactly(reference, from_file, component):
    want = getattr(reference, component).state_dict()
    got = getattr(from_file, component).state_dict()
    assert set(got) == set(want)
    differing = [key for key in want if not torch.equal(got[key], want[key])]
    assert not differing, f"{component}: {differing[:5]}"


def test_image_matches_from_pretrained(reference, from_file):
    want, got = generate(reference), generate(from_file)
    assert got.shape == want.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_project_loader_single_file_spec(tiny_spec, checkpoint, config_folder):
    tiny = load_pipeline(tiny_spec)
    spec = SingleFileSpec(
        source="single_file",
        path=str(checkpoint),
        config=str(config_folder),
        local_files_only=True,
        device="cpu",
    )
    with separate_text_encoders():
        single = load_pipeline(spec)
    np.testing.assert_allclose(generate(single), generate(tiny), rtol=0, atol=1e-5)


def test_diffusers_mixes_up_equal_width_text_encoders(checkpoint, config_folder, reference):
    """Why `separate_text_encoders` exists; when this fails, diffusers fixed it and it can go."""
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(checkpoint), config=str(config_folder), local_files_only=True
    )
    clip_l = reference.text_encoder.state_dict()
    got = pipe.text_encoder_2.state_dict()
    key = "text_model.embeddings.token_embedding.weight"
    assert torch.equal(got[key], clip_l[key.removeprefix("text_model.")])


def test_full_size_sdxl_layout_converts_back():
    """The exporter is generic: on full-size SDXL (meta tensors, no memory) diffusers detects an SDXL
    base checkpoint and its converters give back every key with its shape."""
    pipe = build_random_pipeline(MODEL_CONFIG_ROOT / "sdxl-arch", 0, torch.device("meta"), torch.float32)
    ckpt = sdxl_ldm_state_dict(pipe)
    assert single_file_utils.infer_diffusers_model_type(ckpt) == "xl_base"

    # Keys of the released SDXL base checkpoint. The converters also accept some non-original
    # spellings (an upsampler at `output_blocks.N.1.conv` after an attention), so pin a few here.
    known = {
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.6.0.op.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
    }
    assert {key: tuple(ckpt[key].shape) for key in known if key in ckpt} == known

    converted = {
        "unet": single_file_utils.convert_ldm_unet_checkpoint(ckpt, dict(pipe.unet.config)),
        "vae": single_file_utils.convert_ldm_vae_checkpoint(ckpt, dict(pipe.vae.config)),
        # transformers 5.6+ flattened CLIPTextModel; diffusers strips the prefix the same way.
        "text_encoder": {
            key.removeprefix("text_model."): value
            for key, value in single_file_utils.convert_ldm_clip_checkpoint(ckpt).items()
        },
        "text_encoder_2": single_file_utils.convert_open_clip_checkpoint(
            pipe.text_encoder_2, ckpt, prefix=OPEN_CLIP_PREFIX
        ),
    }
    for component, state in converted.items():
        want = {key: tuple(value.shape) for key, value in getattr(pipe, component).state_dict().items()}
        assert {key: tuple(value.shape) for key, value in state.items()} == want, component
