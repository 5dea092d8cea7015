"""What may share a UNet forward: the one rule, in one place.

Rows share a forward when they run on the same weights with inputs of the same shape: the latent
height and width, and the UNet input channels (a 9-channel inpainting UNet takes mask and masked
image latents with every row). Everything else is per row: kind, steps, the step a row is at,
scheduler, guidance (with or without its unconditional row, which a row drops at its
`guidance_end`), strength, seed, prompts, init image, mask, crop. Later features add a field here
(the LoRA adapter set, the ControlNet), not a branch elsewhere.

A row reusing its deep features this step (`deep_cache_interval`) runs the UNet's shallow branch,
another function of the weights: it shares a forward with other such rows only. A row taking a
full step shares one with every other row of its shape (the full pass that keeps deep features
gives the UNet's own prediction to rows that keep none).
"""

from typing import Hashable


def forward_key(latent_shape: tuple[int, ...], reuses_deep: bool = False) -> Hashable:
    """The sharing key of a row from its latents' shape `(1, channels, height, width)` and whether
    it runs the shallow branch on kept deep features this step."""
    _, _, height, width = latent_shape
    return (height, width, reuses_deep)
