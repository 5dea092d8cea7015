"""Write an SDXL pipeline as one original-format ("LDM"/Stability key layout) `.safetensors` file.

Why this exists: `SingleFileSpec` loads checkpoints with diffusers' `from_single_file`, and tests must
exercise that path without a model hub (none is reachable from the test machines, and real SDXL
checkpoints are gigabytes). So the tests build the tiny random pipeline and write it here in the layout
that Stability's `sgm` code saves and diffusers' single-file converters read.

The mapping is the exact inverse of diffusers 0.42's converters in
`diffusers/loaders/single_file_utils.py` (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`). Block indices are derived from each
model's own config, so the same code exports the tiny test model and full-size SDXL.

Loading an export of the tiny model needs `config=<diffusers folder>`: diffusers recognises an SDXL
base checkpoint by the key `conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias`,
which only exists when the second text encoder has at least 10 layers (full SDXL has 32).

And loading it needs `separate_text_encoders()`: diffusers tells SDXL's two text encoders apart only
by width (768 vs 1280), and the tiny model's are both 32 wide.
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # HF CLIPTextModel keys, kept as they are
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # open_clip names for the bigG encoder

# diffusers ResnetBlock2D names -> LDM ResBlock names (inverse of update_unet_resnet_ldm_to_diffusers).
_UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_UNET_TOP_LEVEL = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
# The VAE mid-block attention: diffusers uses Linear layers, LDM 1x1 convolutions.
_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP_LEVEL = {
    "encoder.conv_in": "encoder.conv_in",
    "encoder.conv_norm_out": "encoder.norm_out",
    "encoder.conv_out": "encoder.conv_out",
    "decoder.conv_in": "decoder.conv_in",
    "decoder.conv_norm_out": "decoder.norm_out",
    "decoder.conv_out": "decoder.conv_out",
    "quant_conv": "quant_conv",
    "post_quant_conv": "post_quant_conv",
}
_OPEN_CLIP_LAYER_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def save_sdxl_single_file(pipe, path) -> Path:
    """Save `pipe` (a `StableDiffusionXLPipeline`) as one LDM-layout `.safetensors` file."""
    state = sdxl_ldm_state_dict(pipe)
    save_file({key: tensor.detach().cpu().contiguous() for key, tensor in state.items()}, str(path))
    return Path(path)


def sdxl_ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The whole pipeline's weights under original-checkpoint keys (tensors are not copied to CPU)."""
    state: dict[str, torch.Tensor] = {}
    for prefix, part in (
        (UNET_PREFIX, _unet_to_ldm(pipe.unet)),
        (VAE_PREFIX, _vae_to_ldm(pipe.vae)),
        (CLIP_L_PREFIX, _clip_l_to_ldm(pipe.text_encoder)),
        (OPEN_CLIP_PREFIX, _open_clip_to_ldm(pipe.text_encoder_2)),
    ):
        state.update({prefix + key: tensor for key, tensor in part.items()})
    return state


ModuleMap = dict[str, tuple[str, dict[str, str]]]


def _rename_modules(state: dict[str, torch.Tensor], modules: ModuleMap) -> dict[str, torch.Tensor]:
    """Rename every key by its module: `modules` maps a diffusers module path to (LDM path, renames of
    the submodule names inside it). Fails on any key no module claims, so nothing is dropped silently."""
    out = {}
    for key, tensor in state.items():
        module, leaf = key.rsplit(".", 1)
        # Walk up the module path until a mapped module claims it; the rest is its inner name.
        parts = module.split(".")
        for cut in range(len(parts), 0, -1):
            owner = ".".join(parts[:cut])
            if owner in modules:
                ldm_owner, inner_names = modules[owner]
                inner = ".".join(parts[cut:])
                inner = inner_names.get(inner, inner)
                out[".".join(p for p in (ldm_owner, inner, leaf) if p)] = tensor
                break
        else:
            raise KeyError(f"no LDM name for {key!r}")
    return out


def _unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    """Inverse of `convert_ldm_unet_checkpoint`.

    LDM numbers the UNet's layers flat: `input_blocks.0` is conv_in, then each down block contributes
    `layers_per_block` (resnet [, attention]) entries plus one entry for its downsampler; each up block
    contributes `layers_per_block + 1` entries and its upsampler rides on the last one (after the
    attention when there is one). The mid block is resnet, attention, resnet.
    """
    layers = unet.config.layers_per_block
    if not isinstance(layers, int):  # the converter itself assumes one int for every block
        raise ValueError(f"layers_per_block must be an int, got {layers!r}")
    modules: ModuleMap = {name: (ldm_name, {}) for name, ldm_name in _UNET_TOP_LEVEL.items()}

    index = 1
    for block_id, block in enumerate(unet.down_blocks):
        block_path = f"down_blocks.{block_id}"
        for layer in range(layers):
            modules[f"{block_path}.resnets.{layer}"] = (f"input_blocks.{index}.0", _UNET_RESNET_NAMES)
            modules[f"{block_path}.attentions.{layer}"] = (f"input_blocks.{index}.1", {})
            index += 1
        if block.downsamplers is not None:
            modules[f"{block_path}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", {})
            index += 1

    for layer in range(len(unet.mid_block.resnets)):
        modules[f"mid_block.resnets.{layer}"] = (f"middle_block.{2 * layer}", _UNET_RESNET_NAMES)
        modules[f"mid_block.attentions.{layer}"] = (f"middle_block.{2 * layer + 1}", {})

    index = 0
    for block_id, block in enumerate(unet.up_blocks):
        block_path = f"up_blocks.{block_id}"
        for layer in range(layers + 1):
            modules[f"{block_path}.resnets.{layer}"] = (f"output_blocks.{index}.0", _UNET_RESNET_NAMES)
            modules[f"{block_path}.attentions.{layer}"] = (f"output_blocks.{index}.1", {})
            index += 1
        if block.upsamplers is not None:
            slot = 2 if getattr(block, "attentions", None) is not None else 1
            modules[f"{block_path}.upsamplers.0.conv"] = (f"output_blocks.{index - 1}.{slot}.conv", {})

    return _rename_modules(unet.state_dict(), modules)


def _vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    """Inverse of `convert_ldm_vae_checkpoint`.

    LDM numbers the decoder's up blocks from the lowest resolution up, i.e. in reverse of diffusers,
    and stores the mid-block attention projections as 1x1 convolutions (the converter squeezes them).
    """
    modules: ModuleMap = {name: (ldm_name, {}) for name, ldm_name in _VAE_TOP_LEVEL.items()}
    for block_id, block in enumerate(vae.encoder.down_blocks):
        ldm_path = f"encoder.down.{block_id}"
        for layer in range(len(block.resnets)):
            modules[f"encoder.down_blocks.{block_id}.resnets.{layer}"] = (
                f"{ldm_path}.block.{layer}",
                _VAE_RESNET_NAMES,
            )
        modules[f"encoder.down_blocks.{block_id}.downsamplers.0.conv"] = (f"{ldm_path}.downsample.conv", {})
    for block_id, block in enumerate(vae.decoder.up_blocks):
        ldm_path = f"decoder.up.{len(vae.decoder.up_blocks) - 1 - block_id}"
        for layer in range(len(block.resnets)):
            modules[f"decoder.up_blocks.{block_id}.resnets.{layer}"] = (
                f"{ldm_path}.block.{layer}",
                _VAE_RESNET_NAMES,
            )
        modules[f"decoder.up_blocks.{block_id}.upsamplers.0.conv"] = (f"{ldm_path}.upsample.conv", {})
    for part in ("encoder", "decoder"):
        for layer in range(len(getattr(vae, part).mid_block.resnets)):
            ldm_path = f"{part}.mid.block_{layer + 1}"
            modules[f"{part}.mid_block.resnets.{layer}"] = (ldm_path, _VAE_RESNET_NAMES)
        modules[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION_NAMES)

    out = _rename_modules(vae.state_dict(), modules)
    for key, tensor in out.items():
        if ".mid.attn_1." in key and key.endswith(".weight") and tensor.ndim == 2:
            out[key] = tensor[:, :, None, None]  # Linear (out, in) -> Conv2d 1x1 (out, in, 1, 1)
    return out


def _clip_l_to_ldm(text_encoder) -> dict[str, torch.Tensor]:
    """Inverse of `convert_ldm_clip_checkpoint`: SDXL stores CLIP-L as the HF model's own state dict.

    transformers >= 5.6 dropped the `text_model.` wrapper of `CLIPTextModel`; checkpoints keep it
    (diffusers looks for `...transformer.text_model.embeddings.position_embedding.weight`).
    """
    state = text_encoder.state_dict()
    return {"text_model." + key.removeprefix("text_model."): tensor for key, tensor in state.items()}


def _open_clip_to_ldm(text_encoder_2) -> dict[str, torch.Tensor]:
    """Inverse of `convert_open_clip_checkpoint` for the bigG encoder (`CLIPTextModelWithProjection`).

    open_clip keeps q, k and v as one `in_proj` matrix (stacked in that order along dim 0) and applies
    the projection as `x @ text_projection`, i.e. it stores the transpose of the Linear weight.
    """
    state = {key.removeprefix("text_model."): t for key, t in text_encoder_2.state_dict().items()}
    out = {
        "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
        "positional_embedding": state.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": state.pop("final_layer_norm.weight"),
        "ln_final.bias": state.pop("final_layer_norm.bias"),
        "text_projection": state.pop("text_projection.weight").T,
    }
    for layer in range(text_encoder_2.config.num_hidden_layers):
        src, dst = f"encoder.layers.{layer}.", f"transformer.resblocks.{layer}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{src}self_attn.{name}_proj.{kind}") for name in ("q", "k", "v")]
            )
            for hf_name, clip_name in _OPEN_CLIP_LAYER_NAMES.items():
                out[f"{dst}{clip_name}.{kind}"] = state.pop(f"{src}{hf_name}.{kind}")
    if state:  # anything left would be lost by the export
        raise KeyError(f"no open_clip name for {sorted(state)}")
    return out


@contextlib.contextmanager
def separate_text_encoders() -> Iterator[None]:
    """While active, `from_single_file` loads `text_encoder_2` from the open_clip keys only.

    diffusers 0.42 (`create_diffusers_clip_model_from_ldm`) picks the CLIP-L weights for any CLIP
    model whose width equals CLIP-L's position embedding width, and checks that before the open_clip
    weights. Real SDXL never hits this (768 vs 1280), but when both encoders have the same width,
    `text_encoder_2` silently gets CLIP-L's weights and keeps `text_projection` on the meta device.
    Hiding the CLIP-L keys from that one call restores what the width check does for real SDXL.
    """
    from diffusers.loaders import single_file

    original = single_file.create_diffusers_clip_model_from_ldm

    def load(cls, checkpoint, **kwargs):
        if cls.__name__ == "CLIPTextModelWithProjection":
            checkpoint = {k: v for k, v in checkpoint.items() if not k.startswith(CLIP_L_PREFIX)}
        return original(cls, checkpoint=checkpoint, **kwargs)

    single_file.create_diffusers_clip_model_from_ldm = load
    try:
        yield
    finally:
        single_file.create_diffusers_clip_model_from_ldm = original
