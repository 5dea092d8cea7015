"""ControlNet conditioning per row: control images, scales and windows, and the residuals one UNet
forward adds.

A deployment hosts some ControlNets (`{name: ControlNetModel}`); a row names any of them with its
own map, scale and start/end window. Rows with and without control, with different scales or
windows, share one UNet forward: for each hosted ControlNet, the UNet rows it steers at this step
(inside their window, scale not 0) run through it together, their residuals are multiplied per
row by that row's scale and placed among zero rows for the rest of the call, and every
ControlNet's residuals are summed into what the UNet adds (the UNet call keeps its compiled batch
size). A call in which no row is steered passes no residuals, so uncontrolled traffic runs the
plain UNet graph. For 8 rows half steered (tiny model, CPU, `benchmarks/bench_controlnet.py`) a
step cost 1.59× the base step this way, 2.98× with the ControlNet run over the whole call on zero
maps, and 1.84× as two UNet forwards (steered rows apart).

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
from deployments.types import ControlRef, check_known_controlnets


@dataclass
class Condition:
    """One ControlNet steering one row: its map (one, whether the row runs one UNet row or the
    two of guidance: diffusers repeats the same map for both), its scale and its window as
    fractions of the row's steps."""

    name: str
    image: torch.Tensor  # (3, H, W), in [0, 1]
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
    edges = canny(pixels, *control.ordered())[0, 0]
    return np.repeat((edges.numpy() * 255).astype(np.uint8)[..., None], 3, axis=2)


def check_hosted(controls: Sequence[ControlRef], hosted: Mapping[str, ControlNetModel]) -> None:
    """Refuse a request naming a ControlNet this deployment does not host (400)."""
    check_known_controlnets(tuple(controls), hosted, "not served by this deployment (it serves", "controlnet_not_served")


class ConditionFactory:
    """Prepares a request's conditions as the diffusers ControlNet pipelines prepare `image`."""

    def __init__(self, vae_scale_factor: int, device: torch.device, dtype: torch.dtype):
        self._processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor, do_convert_rgb=True, do_normalize=False)
        self._device = device
        self._dtype = dtype

    def prepare(self, controls: Sequence[ControlRef], width: int, height: int) -> tuple[Condition, ...]:
        conditions = []
        for control in controls:
            image = self._processor.preprocess(Image.fromarray(control_map(control)), height=height, width=width)
            image = image.to(dtype=torch.float32).to(device=self._device, dtype=self._dtype)[0]
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
        rows = [i for i, row in enumerate(steered) if row.get(name, (None, 0.0))[1] != 0.0]
        if not rows:
            continue
        index = torch.tensor(rows, device=sample.device)
        net_down, net_mid = net(
            sample[index, : net.config.in_channels],
            timesteps[index],
            encoder_hidden_states=prompt[index],
            controlnet_cond=torch.stack([steered[i][name][0] for i in rows]),
            conditioning_scale=1.0,
            added_cond_kwargs={key: value[index] for key, value in added_cond_kwargs.items()},
            return_dict=False,
        )
        scale = torch.tensor([steered[i][name][1] for i in rows], dtype=net_mid.dtype, device=net_mid.device).view(-1, 1, 1, 1)
        net_down = [_scattered(residual * scale, index, len(steered)) for residual in net_down]
        net_mid = _scattered(net_mid * scale, index, len(steered))
        down = net_down if down is None else [a + b for a, b in zip(down, net_down)]
        mid = net_mid if mid is None else mid + net_mid
    if down is None:
        return None
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def _scattered(residual: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """Residuals of the steered rows placed among `rows` zero rows (a zero adds nothing, exactly)."""
    full = residual.new_zeros((rows, *residual.shape[1:]))
    full[index] = residual
    return full
