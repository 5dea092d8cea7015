"""One request's denoising state (a row), prepared and finished with diffusers' own helpers.

A row owns everything that differs between requests: its scheduler instance (Euler, DPM++ and
friends keep per-instance state), its timesteps (img2img and inpaint start part-way), its
`torch.Generator`, its latents, text embeddings and `add_time_ids`, its guidance scale, and for
inpainting its mask, the noised init latents it is blended with at each step, and the crop it is
pasted back into. Preparation calls the kind's diffusers pipeline (`prepare_latents`,
`prepare_mask_latents`, `_get_add_time_ids`, the image and mask processors) built over the
engine's one set of components with the row's own scheduler, in the order the pipeline itself
calls them: a row consumes its generator exactly as a lone diffusers call would, which is what
makes a row's image equal that call's. The refiner stage is a row too (`refine`): the img2img
pipeline over the refiner's components, started from the base stage's latents and generator; and
so is a hires request's second pass (`prepare_hires`): img2img at the larger size from the first
pass's upscaled image or latents, continuing its generator.
"""

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, ContextManager, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    DiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps
from PIL import Image

from deployments.engine.control import RequestControl
from deployments.engine.controlnets import Condition, ConditionFactory
from deployments.pipelines import make_scheduler
from deployments.types import GenerationRequest, guided_steps

#: The diffusers pipeline class of each kind; all are built over the same loaded components.
PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "txt2img": StableDiffusionXLPipeline,
    "img2img": StableDiffusionXLImg2ImgPipeline,
    "inpaint": StableDiffusionXLInpaintPipeline,
    "refine": StableDiffusionXLImg2ImgPipeline,  # the refiner stage: img2img from latents
}


@dataclass
class TextEmbeds:
    """One row's text conditioning: [uncond, cond] rows with guidance, [cond] without."""

    prompt: torch.Tensor  # (1 or 2, tokens, dim)
    pooled: torch.Tensor  # (1 or 2, dim)


@dataclass
class Overlay:
    """What a `padding_mask_crop` row is pasted back into once decoded."""

    mask: Image.Image
    original: Image.Image
    crop: tuple[int, int, int, int]


@dataclass
class Row:
    request: GenerationRequest
    control: RequestControl
    submitted_at: float
    pipe: DiffusionPipeline  # the kind's pipeline, with this row's scheduler
    generator: torch.Generator
    timesteps: torch.Tensor
    step_kwargs: dict[str, Any]
    latents: torch.Tensor  # (1, C, h, w)
    embeds: TextEmbeds
    time_ids: torch.Tensor  # (1 or 2, 6)
    #: Inpainting: the latent-size mask, the masked image's latents (9-channel UNets), and for
    #: 4-channel UNets the clean init latents and the noise they are re-noised with each step.
    mask: Optional[torch.Tensor] = None
    masked_image_latents: Optional[torch.Tensor] = None
    image_latents: Optional[torch.Tensor] = None
    noise: Optional[torch.Tensor] = None
    overlay: Optional[Overlay] = None
    #: The LoRA slot every UNet row of this request uses (0: the base model).
    slot: int = 0
    #: The ControlNets steering this row.
    conditions: tuple[Condition, ...] = ()
    index: int = 0
    admitted_at: float = field(default_factory=time.perf_counter)
    #: The engine step this row would finish at if it took every step from its admission: when
    #: not every row takes a step, the earliest due go first (`StepEngine._taking_step`).
    due: int = 0
    #: The most rows (requests) that shared one forward with this row so far.
    shared_with: int = 1
    #: Steps of the request's other pass before and after this row's (hires): progress counts
    #: both passes.
    steps_before: int = 0
    steps_after: int = 0
    #: `deep_cache_interval` > 1: the deep features of the row's last full UNet step, one per UNet
    #: row of that step (`deep_cache`), which its steps until the next full one reuse.
    deep: Optional[torch.Tensor] = None

    @property
    def guided(self) -> bool:
        """Classifier-free guidance at this step: an unconditional UNet row beside the conditional
        one, for the first `guided_steps` of the row's steps (`guidance_end`); after them the
        conditional row alone, as diffusers' dynamic-CFG callback leaves its pipeline."""
        guided_until = guided_steps(len(self.timesteps), self.request.guidance_end)
        return self.request.guidance_scale > 1.0 and self.index < guided_until

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def hands_off(self) -> bool:
        """The base stage of a refined request: it ends as latents for the refiner, not pixels."""
        return self.request.refiner is not None and self.request.handoff is None

    @property
    def upscales(self) -> bool:
        """The first pass of a hires request: it ends by becoming its second pass's row."""
        return self.request.hires is not None

    @property
    def upscales_latents(self) -> bool:
        """A hires first pass whose second pass starts from its latents (no decode)."""
        return self.upscales and self.request.hires.upscaler == "latent"

    @property
    def timestep(self) -> torch.Tensor:
        return self.timesteps[self.index]

    def report(self) -> None:
        """Progress over every pass of the request."""
        before = self.steps_before
        self.control.report(before + self.index, before + len(self.timesteps) + self.steps_after)

    def unet_rows(self) -> int:
        return 2 if self.guided else 1

    @property
    def caches_deep(self) -> bool:
        """The row keeps its UNet's deep features between full steps (`deep_cache_interval` > 1)."""
        return self.request.deep_cache_interval > 1

    @property
    def reuses_deep(self) -> bool:
        """This step runs the UNet's shallow branch on the deep features of the row's last full
        step: every step but each `deep_cache_interval`-th of the row's own steps (0 included)."""
        return self.deep is not None and self.index % self.request.deep_cache_interval != 0

    def deep_features(self) -> torch.Tensor:
        """The kept deep features for this step's UNet rows: once guidance has ended, the
        conditional (last) row of a guided full step's pair."""
        return self.deep[-self.unet_rows():]

    def conditioning(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's prompt embeddings, pooled embeddings and `add_time_ids`, one per UNet row.
        Once guidance has ended, the conditional (last) rows only: the callback keeps `chunk(2)[-1]`
        of each. The unconditional rows stay stored, since a hires pass starts guided again from them."""
        rows = self.unet_rows()
        return self.embeds.prompt[-rows:], self.embeds.pooled[-rows:], self.time_ids[-rows:]

    def model_input(self) -> torch.Tensor:
        """This step's UNet input rows: the scaled latents (twice with guidance), plus the mask
        and masked image latents for a 9-channel inpainting UNet."""
        sample = self.pipe.scheduler.scale_model_input(self.latents, self.timestep)
        if self.masked_image_latents is not None:
            sample = torch.cat([sample, self.mask, self.masked_image_latents], dim=1)
        return torch.cat([sample] * self.unet_rows())

    def steering(self) -> list[dict[str, tuple[torch.Tensor, float]]]:
        """Per UNet row of this step: the ControlNets that steer it, with its map and scale (one
        map for both halves of guidance, so a row past `guidance_end` steers its one UNet row)."""
        steps = len(self.timesteps)
        steered = {c.name: (c.image, c.scale_at(self.index, steps)) for c in self.conditions}
        return [{name: (image, scale) for name, (image, scale) in steered.items()} for _ in range(self.unet_rows())]

    def advance(self, noise_pred: torch.Tensor) -> None:
        """Apply guidance and this row's scheduler step (and inpainting's blend) for one step."""
        if self.guided:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + self.request.guidance_scale * (cond - uncond)
        t = self.timestep
        self.latents = self.pipe.scheduler.step(noise_pred, t, self.latents, **self.step_kwargs, return_dict=False)[0]
        if self.image_latents is not None:  # 4-channel inpainting: keep the unmasked area
            init = self.image_latents
            if self.index < len(self.timesteps) - 1:
                init = self.pipe.scheduler.add_noise(init, self.noise, torch.tensor([self.timesteps[self.index + 1]]))
            self.latents = (1 - self.mask) * init + self.mask * self.latents
        self.index += 1


class RowFactory:
    """Prepares rows over one pipeline's components: text encoding for a batch of admitted
    requests in one pass, then each row's latents and timesteps."""

    def __init__(self, pipeline: StableDiffusionXLPipeline):
        self._base = pipeline
        self._components = dict(pipeline.components)
        self.device = pipeline._execution_device
        self.dtype = pipeline.unet.dtype
        self._conditions = ConditionFactory(pipeline.vae_scale_factor, self.device, self.dtype)

    def pipeline_for(self, request: GenerationRequest) -> DiffusionPipeline:
        """A light pipeline of the request's kind over the shared weights (as `from_pipe` makes,
        ~0.2 ms) owning the request's own scheduler."""
        base = self._base
        scheduler = make_scheduler(request.scheduler, base.scheduler.config, request.timestep_spacing)
        components = {**self._components, "scheduler": scheduler}
        options = {}
        if "requires_aesthetics_score" in base.config:  # a refiner (or an img2img-built base)
            options["requires_aesthetics_score"] = base.config.requires_aesthetics_score
        pipe = PIPELINE_CLASSES[_kind(request)](
            **components,
            force_zeros_for_empty_prompt=base.config.force_zeros_for_empty_prompt,
            add_watermarker=getattr(base, "watermark", None) is not None,
            **options,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def encode(self, requests: list[GenerationRequest], adapters: ContextManager = nullcontext()) -> list[TextEmbeds]:
        """Every request's prompts in one text-encoder pass (inside `adapters`: row i with its
        LoRAs). A request without a negative prompt gets what the plain pipeline gives it alone:
        zeros when the model sets `force_zeros_for_empty_prompt`, else the empty prompt's embedding."""
        guided = [request.guidance_scale > 1.0 for request in requests]
        zeroed = [request.negative_prompt is None and self._base.config.force_zeros_for_empty_prompt for request in requests]
        # Negative prompts are encoded only when a guided row uses its encoding: a request
        # without one on SDXL (zeros) costs one pass of each text encoder, not two (a lone
        # request's encoders took 0.05-0.07 s of host time on an H200, BENCHMARKS.md).
        with adapters:
            prompt, negative, pooled, negative_pooled = self._base.encode_prompt(
                prompt=[request.prompt for request in requests],
                device=self.device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=any(g and not z for g, z in zip(guided, zeroed)),
                negative_prompt=[request.negative_prompt or "" for request in requests],
            )
        embeds = []
        for row, (request, with_guidance) in enumerate(zip(requests, guided)):
            if not with_guidance:
                embeds.append(TextEmbeds(prompt[row : row + 1], pooled[row : row + 1]))
                continue
            if zeroed[row]:
                uncond, uncond_pooled = torch.zeros_like(prompt[row : row + 1]), torch.zeros_like(pooled[row : row + 1])
            else:
                uncond, uncond_pooled = negative[row : row + 1], negative_pooled[row : row + 1]
            embeds.append(
                TextEmbeds(torch.cat([uncond, prompt[row : row + 1]]), torch.cat([uncond_pooled, pooled[row : row + 1]]))
            )
        return embeds

    def prepare(
        self,
        request: GenerationRequest,
        control: RequestControl,
        embeds: TextEmbeds,
        submitted_at: float,
        slot: int = 0,
        generator: Optional[torch.Generator] = None,
        **inputs: Any,
    ) -> Row:
        """The row of a (defaults-resolved) request, in the steps its diffusers pipeline takes.
        `generator`: continue this one (a hires pass) instead of seeding a new one; `inputs`: what
        the kind's preparation takes besides the request (a hires pass's `init_latents`)."""
        pipe = self.pipeline_for(request)
        # CPU generators: the same seed gives the same noise on any device. The refiner stage
        # continues the base stage's generator.
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(request.seed)
            if request.handoff is not None:
                generator.set_state(torch.from_numpy(request.handoff.generator_state))
        prepared = _PREPARE[_kind(request)](self, pipe, request, generator, **inputs)
        time_ids = prepared.pop("time_ids")
        if request.guidance_scale > 1.0:
            negative_time_ids = prepared.pop("negative_time_ids", time_ids)
            time_ids = torch.cat([negative_time_ids, time_ids])
        else:
            prepared.pop("negative_time_ids", None)
        # The ControlNet pipelines prepare the control image before their latents; it draws
        # nothing from the generator, so the order only matters for readability.
        conditions = self._conditions.prepare(request.controlnets, request.width, request.height)
        return Row(
            request=request,
            control=control,
            submitted_at=submitted_at,
            slot=slot,
            conditions=conditions,
            pipe=pipe,
            generator=generator,
            # eta 0.0: the SDXL pipelines' default (DDIM's and TCD's steps are deterministic).
            step_kwargs=pipe.prepare_extra_step_kwargs(generator, 0.0),
            embeds=TextEmbeds(embeds.prompt.to(self.device), embeds.pooled.to(self.device)),
            time_ids=time_ids.to(self.device),
            steps_after=request.hires.pass_steps() if request.hires is not None else 0,
            **prepared,
        )

    # -- the kinds, each in the order of its diffusers pipeline ---------------------------------

    def _txt2img(self, pipe: StableDiffusionXLPipeline, request: GenerationRequest, generator: torch.Generator) -> dict:
        height, width = request.height, request.width
        timesteps, _ = retrieve_timesteps(pipe.scheduler, request.num_inference_steps, self.device)
        timesteps = _until_switch(pipe, timesteps, request)
        latents = pipe.prepare_latents(
            1, pipe.unet.config.in_channels, height, width, self.dtype, self.device, generator
        )
        time_ids = pipe._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=self.dtype, text_encoder_projection_dim=self._projection_dim()
        )
        if hasattr(pipe.scheduler, "set_begin_index"):
            pipe.scheduler.set_begin_index(0)
        return {"timesteps": timesteps, "latents": latents, "time_ids": time_ids}

    def _img2img(
        self,
        pipe: StableDiffusionXLImg2ImgPipeline,
        request: GenerationRequest,
        generator: torch.Generator,
        init_latents: Optional[torch.Tensor] = None,
    ) -> dict:
        """From `request.init_image`, or from `init_latents` (a hires pass's upscaled latents),
        which diffusers' img2img takes as `image` when it has the latent channels."""
        image = init_latents if init_latents is not None else pipe.image_processor.preprocess(Image.fromarray(request.init_image))
        timesteps = self._partial_timesteps(pipe, request)
        latents = pipe.prepare_latents(image, timesteps[:1], 1, 1, self.dtype, self.device, generator)
        timesteps = _until_switch(pipe, timesteps, request)
        return {"timesteps": timesteps, "latents": latents, **self._partial_time_ids(pipe, request)}

    def _refine(self, pipe: StableDiffusionXLImg2ImgPipeline, request: GenerationRequest, generator: torch.Generator) -> dict:
        """The refiner stage, as `StableDiffusionXLImg2ImgPipeline` runs with `image` = the base's
        latents: from `denoising_start = switch_at` without new noise (ensemble), or re-noised to
        `strength` (post)."""
        settings = request.refiner
        ensemble = settings.mode == "ensemble"
        latents = torch.from_numpy(request.handoff.latents)[None]
        retrieve_timesteps(pipe.scheduler, settings.steps, self.device)
        timesteps, _ = pipe.get_timesteps(
            settings.steps, settings.strength or 0.0, self.device, denoising_start=settings.switch_at if ensemble else None
        )
        latents = pipe.prepare_latents(
            latents, timesteps[:1], 1, 1, self.dtype, self.device, generator, add_noise=not ensemble
        )
        return {"timesteps": timesteps, "latents": latents, **self._partial_time_ids(pipe, request)}

    def _inpaint(self, pipe: StableDiffusionXLInpaintPipeline, request: GenerationRequest, generator: torch.Generator) -> dict:
        height, width = request.height, request.width
        original = Image.fromarray(request.init_image)
        mask_image = Image.fromarray(request.mask_image)
        if request.mask_blur:
            mask_image = VaeImageProcessor.blur(mask_image, blur_factor=request.mask_blur)
        crop, resize_mode = None, "default"
        if request.padding_mask_crop is not None:
            crop = pipe.mask_processor.get_crop_region(mask_image, width, height, pad=request.padding_mask_crop)
            resize_mode = "fill"
        init_image = pipe.image_processor.preprocess(
            original, height=height, width=width, crops_coords=crop, resize_mode=resize_mode
        ).to(dtype=torch.float32)
        mask = pipe.mask_processor.preprocess(
            mask_image, height=height, width=width, resize_mode=resize_mode, crops_coords=crop
        )
        masked_image = init_image * (mask < 0.5)
        timesteps = self._partial_timesteps(pipe, request)
        four_channels = pipe.unet.config.in_channels == 4
        outputs = pipe.prepare_latents(
            1,
            pipe.vae.config.latent_channels,
            height,
            width,
            self.dtype,
            self.device,
            generator,
            image=init_image,
            timestep=timesteps[:1],
            is_strength_max=request.strength == 1.0,
            return_noise=True,
            return_image_latents=four_channels,
        )
        latents, noise = outputs[:2]
        # Encodes the masked image even for a 4-channel UNet, which ignores it: the pipeline does,
        # and it draws from the generator.
        latent_mask, masked_latents = pipe.prepare_mask_latents(
            mask, masked_image, 1, height, width, self.dtype, self.device, generator, False
        )
        return {
            "timesteps": timesteps,
            "latents": latents,
            "mask": latent_mask,
            "masked_image_latents": None if four_channels else masked_latents,
            "image_latents": outputs[2] if four_channels else None,
            "noise": noise if four_channels else None,
            "overlay": None if crop is None else Overlay(mask_image, original, crop),
            **self._partial_time_ids(pipe, request),
        }

    def _partial_timesteps(self, pipe: DiffusionPipeline, request: GenerationRequest) -> torch.Tensor:
        """img2img/inpaint: the last `denoising_steps()` of the schedule, as `get_timesteps`
        takes them (at least one step, where diffusers would take none)."""
        steps = request.num_inference_steps
        retrieve_timesteps(pipe.scheduler, steps, self.device)
        start = (steps - request.denoising_steps()) * pipe.scheduler.order
        if hasattr(pipe.scheduler, "set_begin_index"):
            pipe.scheduler.set_begin_index(start)
        return pipe.scheduler.timesteps[start:]

    def _partial_time_ids(self, pipe: DiffusionPipeline, request: GenerationRequest) -> dict:
        size = (request.height, request.width)
        # The aesthetic scores count only for a UNet conditioned on them (`requires_aesthetics_score`):
        # the refiner's; diffusers' defaults otherwise.
        scores = (6.0, 2.5) if request.handoff is None else (request.refiner.aesthetic_score, request.refiner.negative_aesthetic_score)
        time_ids, negative_time_ids = pipe._get_add_time_ids(
            size, (0, 0), size, *scores, size, (0, 0), size, dtype=self.dtype,
            text_encoder_projection_dim=self._projection_dim(),
        )
        return {"time_ids": time_ids, "negative_time_ids": negative_time_ids}

    def _projection_dim(self) -> int:
        return self._base.text_encoder_2.config.projection_dim

    def prepare_hires(self, first: Row, image: Optional[torch.Tensor] = None) -> Row:
        """The second pass of a hires request whose first pass `first` just finished, as diffusers'
        img2img pipeline runs it after the txt2img call with the same generator: from the first
        pass's decoded `image` (3, h, w) in [-1, 1] resized with PIL's Lanczos (`lanczos`), or
        from its latents resized bilinearly (`latent`). Keeps the first pass's text embeddings
        (the same prompts) and LoRA slot; its ControlNets steer the first pass only."""
        hires = first.request.hires
        request = hires_pass_request(first.request)
        inputs = {}
        if hires.upscaler == "lanczos":
            (pil,) = first.pipe.image_processor.postprocess(image[None], output_type="pil")
            request = request.model_copy(
                update={"init_image": np.asarray(pil.resize((hires.width, hires.height), Image.LANCZOS))}
            )
        else:
            size = (hires.height // self._base.vae_scale_factor, hires.width // self._base.vae_scale_factor)
            inputs["init_latents"] = F.interpolate(first.latents, size=size, mode="bilinear")
        row = self.prepare(request, first.control, first.embeds, first.submitted_at, first.slot, first.generator, **inputs)
        row.steps_before = first.steps_before + len(first.timesteps)
        return row


_PREPARE = {
    "txt2img": RowFactory._txt2img,
    "img2img": RowFactory._img2img,
    "inpaint": RowFactory._inpaint,
    "refine": RowFactory._refine,
}


def _kind(request: GenerationRequest) -> str:
    """How a row is prepared: the request's kind, or `refine` for a refiner stage."""
    return "refine" if request.handoff is not None else request.kind


def hires_pass_request(request: GenerationRequest) -> GenerationRequest:
    """The image-to-image request a hires request's second pass runs (the init image or latents
    are the engine's to add): the target size, the pass's strength and steps, no ControlNets."""
    hires = request.hires
    return request.model_copy(
        update={
            "kind": "img2img",
            "width": hires.width,
            "height": hires.height,
            "strength": hires.strength,
            "num_inference_steps": hires.steps,
            "controlnets": (),
            "hires": None,
        }
    )


@contextmanager
def vae_tiling(vae: Any, pixels: int, above: Optional[int]) -> Iterator[None]:
    """Run the VAE tiled (diffusers' `enable_tiling`: overlapping tiles of its `sample_size`,
    blended) while an image of `pixels` is encoded or decoded, when that is above `above`."""
    previous = vae.use_tiling
    vae.use_tiling = above is not None and pixels > above
    try:
        yield
    finally:
        vae.use_tiling = previous


def _until_switch(pipe: DiffusionPipeline, timesteps: torch.Tensor, request: GenerationRequest) -> torch.Tensor:
    """The base stage of an ensemble stops at `switch_at`: the timesteps at or above the cut-off,
    as diffusers' `denoising_end` keeps them."""
    if request.refiner is None or request.refiner.mode != "ensemble":
        return timesteps
    train_steps = pipe.scheduler.config.num_train_timesteps
    cutoff = int(round(train_steps - request.refiner.switch_at * train_steps))
    return timesteps[: int((timesteps >= cutoff).sum())]


def decode(pipe: StableDiffusionXLPipeline, latents: torch.Tensor) -> torch.Tensor:
    """Latents → images in [-1, 1] as the SDXL pipelines decode them (an fp16 VAE that asks for it
    is upcast for the call)."""
    vae = pipe.vae
    needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
    if needs_upcasting:
        vae.to(dtype=torch.float32)
        latents = latents.to(torch.float32)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std / vae.config.scaling_factor + mean
    else:
        latents = latents / vae.config.scaling_factor
    images = vae.decode(latents, return_dict=False)[0]
    if needs_upcasting:
        vae.to(dtype=torch.float16)
    if pipe.watermark is not None:
        images = pipe.watermark.apply_watermark(images)
    return images


def to_pixels(pipe: StableDiffusionXLPipeline, row: Row, image: torch.Tensor) -> np.ndarray:
    """One decoded image (3, H, W) → float pixels in [0, 1], (H, W, 3); a cropped inpaint is
    pasted back into its original here (`apply_overlay`, as diffusers does, through PIL)."""
    if row.overlay is None:
        return pipe.image_processor.postprocess(image[None], output_type="np")[0]
    (pil,) = pipe.image_processor.postprocess(image[None], output_type="pil")
    overlay = row.overlay
    pasted = pipe.image_processor.apply_overlay(overlay.mask, overlay.original, pil, overlay.crop)
    return np.asarray(pasted, dtype=np.float32) / 255.0
