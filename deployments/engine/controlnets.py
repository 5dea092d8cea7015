"""ControlNet conditioning per row: control images, scales and windows, and the residuals one UNet
forward adds.

A deployment hosts some ControlNets (`{name: ControlNetModel}`); a row names any of them with its
own map, scale and start/end window. Rows with and without control, with different scales or
windows, share one UNet forward: for each hosted ControlNet that some row of a UNet call uses at
this step, the ControlNet runs over the whole call (rows that do not use it get a zero map and
scale 0, so the call keeps its compiled batch size) and its residuals, multiplied per row by that
row's scale, are summed into the residuals the UNet adds. A call in which no row is steered passes
no residuals, so uncontrolled traffic runs the plain UNet graph.

Each row's numbers are those of diffusers' `StableDiffusionXLControlNetPipeline` (and its img2img
twin) run alone: the map is prepared by its `control_image_processor` steps, the window is its
`controlnet_keep` rule, and scaling the residuals after the ControlNet (called at scale 1.0) equals
scaling inside it. Knows torch and diffusers, never Ray or HTTP.
"""

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from diffusers import ControlNetModel
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from deployments.canny import canny
from deployments.types import ControlRef, InvalidRequestError


@dataclass
class Condition:
    """One ControlNet steering one row: its map as UNet rows (twice with guidance), its scale and
    its window as fractions of the row's steps."""

    name: str
    image: torch.Tensor  # (unet rows, 3, H, W), in [0, 1]
    scale: float
    start: float
    end: float

    def scale_at(self, index: int, steps: int) -> float:
        """The scale at step `index` of `steps`: diffusers' `controlnet_keep` rule (0 outside the
        window, which is as if the ControlNet were absent)."""
        outside = index / steps < self.start or (index + 1) / steps > self.end
        return 0.0 if outside else self.scale


def control_map(control: ControlRef) -> np.ndarray:
    """The map a ControlNet follows, uint8 RGB: `image` as given, or made by its preprocessor
    (canny edges, white on black, on all three channels)."""
    if control.preprocess is None:
        return control.image
    pixels = torch.from_numpy(control.image).permute(2, 0, 1)[None].float() / 255.0
    edges = canny(pixels, control.low_threshold, control.high_threshold)[0, 0]
    return np.repeat((edges.numpy() * 255).astype(np.uint8)[..., None], 3, axis=2)


def check_hosted(controls: Sequence[ControlRef], hosted: Mapping[str, ControlNetModel]) -> None:
    """Refuse a request naming a ControlNet this deployment does not host (400)."""
    for index, control in enumerate(controls):
        if control.name not in hosted:
            served = ", ".join(sorted(hosted)) or "none"
            raise InvalidRequestError(
                f"controlnets[{index}].name {control.name!r} is not served by this deployment (it serves: {served})",
                param=f"controlnets[{index}].name",
                code="controlnet_not_served",
            )


class ConditionFactory:
    """Prepares a request's conditions as the diffusers ControlNet pipelines prepare `image`."""

    def __init__(self, vae_scale_factor: int, device: torch.device, dtype: torch.dtype):
        self._processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_convert_rgb=True, do_normalize=False)
        self._device = device
        self._dtype = dtype

    def prepare(self, controls: Sequence[ControlRef], width: int, height: int, guided: bool) -> tuple[Condition, ...]:
        conditions = []
        for control in controls:
            image = self._processor.preprocess(Image.fromarray(control_map(control)), height=height, width=width)
            image = image.to(dtype=torch.float32).to(device=self._device, dtype=self._dtype)
            if guided:
                image = torch.cat([image] * 2)
            conditions.append(
                Condition(control.name, image, control.conditioning_scale, control.guidance_start, control.guidance_end)
            )
        return tuple(conditions)


def residuals(
    controlnets: Mapping[str, ControlNetModel],
    steered: Sequence[dict[str, tuple[torch.Tensor, float]]],
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    prompt: torch.Tensor,
    added_cond_kwargs: dict[str, torch.Tensor],
) -> Optional[dict[str, object]]:
    """The UNet's extra keyword arguments for one call: `steered[i]` maps the ControlNets UNet row
    `i` uses at this step to (its map row, its scale). None when no row is steered."""
    down, mid = None, None
    for name, net in controlnets.items():
        scales = [row[name][1] if name in row else 0.0 for row in steered]
        if not any(scales):
            continue
        blank = None
        images = []
        for row in steered:
            if name in row:
                images.append(row[name][0])
            else:
                blank = blank if blank is not None else torch.zeros_like(next(r[name][0] for r in steered if name in r))
                images.append(blank)
        net_down, net_mid = net(
            sample[:, : net.config.in_channels],
            timesteps,
            encoder_hidden_states=prompt,
            controlnet_cond=torch.stack(images),
            conditioning_scale=1.0,
            added_cond_kwargs=added_cond_kwargs,
            return_dict=False,
        )
        scale = torch.tensor(scales, dtype=net_mid.dtype, device=net_mid.device).view(-1, 1, 1, 1)
        net_down = [residual * scale for residual in net_down]
        net_mid = net_mid * scale
        down = net_down if down is None else [a + b for a, b in zip(down, net_down)]
        mid = net_mid if mid is None else mid + net_mid
    if down is None:
        return None
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
