"""DeepCache-style step caching: a row reuses the UNet's deep features between its full steps.

The UNet's low-resolution features change little from one denoising step to the next (Ma et al.,
"DeepCache", CVPR 2024, report 2.3× on SD 1.5 at a small quality cost). A row with
`deep_cache_interval` N runs the whole UNet on its steps 0, N, 2N, … and keeps what enters the
final up block (the last-but-one up block's output, at the latent's full resolution); on the steps
between, only the shallow branch runs: `conv_in`, the first down block (whose outputs are the
final up block's skip connections) and the final up block on the kept features. On SDXL that
branch is the 128² level of a 1024² image, all ResNets, no attention.

Both passes follow `UNet2DConditionModel.forward` (diffusers 0.42) for what the engine passes:
SDXL's `text_time` added conditioning and, on full passes, ControlNet residuals. The full pass's
noise prediction is the UNet's own, and a shallow pass given the deep features of the same step
returns it too (tests/test_deep_cache.py): the only approximation is reusing features of an
earlier step. Compiled with the UNet's settings when `optimize.compile` is on (`compile`: one
graph per pass and shape). Knows torch and diffusers only.
"""

from typing import Optional

import torch
from diffusers import UNet2DConditionModel


class DeepCacheUNet(torch.nn.Module):
    """The two passes of a deep-feature-caching row over one UNet's weights (shared, not copied)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        config = unet.config
        unsupported = {
            "class_embed_type": config.class_embed_type,
            "center_input_sample": config.center_input_sample or None,
            "encoder_hid_dim_type": config.encoder_hid_dim_type,
            "addition_embed_type": None if config.addition_embed_type in (None, "text_time") else config.addition_embed_type,
        }
        given = {name: value for name, value in unsupported.items() if value is not None}
        if given:
            raise ValueError(f"deep feature caching supports SDXL-style UNets; this one sets {given}")
        self.unet = unet
        self._full, self._shallow = self._full_pass, self._shallow_pass

    def compile(self, **kwargs) -> None:
        """`torch.compile` both passes with `kwargs` (the UNet's own compile settings)."""
        self._full = torch.compile(self._full_pass, **kwargs)
        self._shallow = torch.compile(self._shallow_pass, **kwargs)

    def full(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor],
        down_block_additional_residuals: Optional[tuple[torch.Tensor, ...]] = None,
        mid_block_additional_residual: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole UNet: its noise prediction and the deep features later steps may reuse."""
        return self._full(
            sample, timestep, encoder_hidden_states, added_cond_kwargs,
            down_block_additional_residuals, mid_block_additional_residual,
        )

    def shallow(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor],
        deep: torch.Tensor,
    ) -> torch.Tensor:
        """The shallow branch on `deep` (from a full pass of the same rows): the noise prediction."""
        return self._shallow(sample, timestep, encoder_hidden_states, added_cond_kwargs, deep)

    # -- the passes, as UNet2DConditionModel.forward runs them ---------------------------------------

    def _full_pass(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, down_residuals, mid_residual):
        unet = self.unet
        # A side not divisible by the up blocks' total factor makes each upsampler take its skip's size.
        forward_upsample_size = any(side % 2**unet.num_upsamplers for side in sample.shape[-2:])
        emb, encoder_hidden_states = self._embeddings(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        sample = unet.conv_in(sample)
        skips = (sample,)
        for block in unet.down_blocks:
            sample, outputs = _run(block, sample, emb, encoder_hidden_states)
            skips += outputs
        if down_residuals is not None:  # a ControlNet's: added to every skip and to the mid block's output
            skips = tuple(skip + residual for skip, residual in zip(skips, down_residuals))
        sample = _run(unet.mid_block, sample, emb, encoder_hidden_states)
        if mid_residual is not None:
            sample = sample + mid_residual
        last = len(unet.up_blocks) - 1
        upsample_size, deep = None, sample
        for index, block in enumerate(unet.up_blocks):
            outputs, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            if index < last and forward_upsample_size:
                upsample_size = skips[-1].shape[2:]
            if index == last:
                deep = sample
            sample = _up(block, sample, emb, encoder_hidden_states, outputs, upsample_size)
        return self._out(sample), deep

    def _shallow_pass(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, deep):
        unet = self.unet
        emb, encoder_hidden_states = self._embeddings(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        sample = unet.conv_in(sample)
        # The first down block's downsampled output feeds the deeper blocks only; it is computed
        # (one strided convolution) because the block's forward is called whole.
        _, outputs = _run(unet.down_blocks[0], sample, emb, encoder_hidden_states)
        final = unet.up_blocks[-1]
        skips = ((sample,) + outputs)[: len(final.resnets)]
        return self._out(_up(final, deep, emb, encoder_hidden_states, skips, None))

    def _embeddings(self, sample, timestep, encoder_hidden_states, added_cond_kwargs):
        unet = self.unet
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
        added = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
        if added is not None:
            emb = emb + added
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        encoder_hidden_states = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        return emb, encoder_hidden_states

    def _out(self, sample):
        unet = self.unet
        if unet.conv_norm_out is not None:
            sample = unet.conv_act(unet.conv_norm_out(sample))
        return unet.conv_out(sample)


def _run(block, sample, emb, encoder_hidden_states):
    """A down or mid block, with the text conditioning when it has cross-attention."""
    if getattr(block, "has_cross_attention", False):
        return block(sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
    return block(sample, temb=emb)


def _up(block, sample, emb, encoder_hidden_states, skips, upsample_size):
    if getattr(block, "has_cross_attention", False):
        return block(
            hidden_states=sample, temb=emb, res_hidden_states_tuple=skips,
            encoder_hidden_states=encoder_hidden_states, upsample_size=upsample_size,
        )
    return block(hidden_states=sample, temb=emb, res_hidden_states_tuple=skips, upsample_size=upsample_size)
