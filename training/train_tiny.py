"""Train the tiny SDXL model family on the shapes world (`training/shapes.py`).

    python -m training.train_tiny --out configs --device cuda          # the shipped recipe, ~18 min on an H100
    python -m training.train_tiny --out /tmp/tiny --profile cpu         # smaller batches, ~2.6 h on 2 CPU cores
    python -m training.train_tiny --out /tmp/tiny --smoke               # seconds, any machine

Stages, in order (``--stages`` picks some; a stage that is not run reads its inputs from ``--out``):

1. ``vae``: the AutoencoderKL of ``configs/models/tiny/vae`` (scale factor 8), on normal and pastel
   renders; its ``scaling_factor`` is then set to 1 / std of the latents, as for SDXL.
   ``--vae-soft-share``, ``--vae-slope-weight``, ``--vae-widths`` and ``--vae-decode-mean`` are
   experiment switches (soft renders, a Sobel-gradient loss, a wider VAE, no posterior sampling),
   off in the shipped recipe (README, "The tiny refiner").
2. ``base``: the UNet **and both text encoders**, with SDXL's objective: epsilon prediction under the
   model's own scheduler config (scaled-linear betas, 1000 steps), SDXL's size/crop time ids, and
   10% of captions dropped to zero embeddings (what the pipeline feeds as the unconditional half,
   ``force_zeros_for_empty_prompt``). The text encoders are trained, not frozen: random 64-wide
   encoders over byte tokens would leave the UNet to learn spelling through fixed noise.
3. ``controlnet``: a canny ControlNet copied from the trained UNet (``ControlNetModel.from_unet``),
   on canny edges of the same scenes; 80% of the captions lose their position and size words so
   the edges must carry the layout, and timesteps are drawn toward high noise, where layout is
   decided.
4. ``silhouette``: a second ControlNet, the same way, on the shape's area white on black
   (``shapes.silhouette``): layout and shape without colour.
5. ``lora``: a LoRA on the frozen UNet trained on pastel renders of the same captions.
6. ``refiner`` (only when ``--stages`` names it): a second UNet laid out as SDXL's refiner, for
   ``StableDiffusionXLImg2ImgPipeline`` from ``denoising_start=0.8``: conditioned on the base's
   second text encoder alone and on five time ids (size, crop, aesthetic score), trained only on
   the last 20% of denoising (timesteps below 200) with the base, VAE and text encoders frozen.
   The VAE's encoder keeps almost nothing of an edge's profile, so the base's latents decode as
   sharp as a render's round trip, and a refiner trained on encoded renders has nothing to add
   (README, "The tiny refiner"). Its sharp target is instead each scene's latents sharpened by
   decoder inversion (``Trainer.sharpened_latents``): from the base's kind of latents (the
   render's posterior), scored 6.0, it learns the step toward them; scored 2.5, plain denoising
   (diffusers' default ``aesthetic_score`` and ``negative_aesthetic_score``), so guidance at the
   default scale steers to sharp edges. It starts from the trained base UNet's weights; its
   scenes are sharpened once into a latent pool, each drawn about 100 times.

Everything is seeded: the initial weights (``--seed``), each stage's scene stream and noise. The
same command on the same device type gives the same weights; GPU kernels may differ in the last
bits from CPU ones. Writes ``OUT/models/tiny`` (a complete ``save_pretrained`` pipeline),
``OUT/models/tiny-controlnet-canny``, ``OUT/models/tiny-controlnet-silhouette``, ``OUT/loras/pastel.safetensors``,
``OUT/models/tiny-refiner`` (``model_index.json``, ``unet/`` and ``scheduler/``; it shares the base's VAE
and second text encoder, as SDXL's refiner does, and loads with
``StableDiffusionXLImg2ImgPipeline.from_pretrained(dir, text_encoder_2=base.text_encoder_2,
tokenizer_2=base.tokenizer_2, vae=base.vae)``) and ``OUT/models/tiny-training.json`` (the command,
steps, losses and timings).
"""

import argparse
import json
import logging
import math
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDPMScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from configs.model_spec import MODEL_CONFIG_ROOT
from deployments.canny import canny
from deployments.pipelines import build_random_pipeline, byte_level_tokenizer
from training import judge, shapes

logger = logging.getLogger("train_tiny")

STAGES = ("vae", "base", "controlnet", "silhouette", "lora", "refiner")
#: What runs without ``--stages``: the refiner came after the shipped recipe and is trained on its
#: own, on top of a finished base (``--stages refiner``).
DEFAULT_STAGES = STAGES[:-1]
NOISE_OFFSET = 0.1
#: The refiner trains on timesteps below this: ``denoising_start=0.8`` hands over at 1000 * (1 - 0.8).
REFINER_TIMESTEPS = 200
#: Aesthetic scores of the sharpened target and of the base's look: diffusers' ``aesthetic_score``
#: and ``negative_aesthetic_score`` defaults, so guidance with the defaults steers toward sharp edges.
SHARP_SCORE, SOFT_SCORE = 6.0, 2.5
#: The guidance scale the refiner's score is trained for: diffusers' and the service's default.
REFINER_GUIDANCE = 5.0
#: Decoder inversion of the refiner's sharp latents (`Trainer.sharpened_latents`), without the pull,
#: on 32 held-out renders at 128² (edge sharpness of the round trip 0.229): 20 steps 0.262, 40
#: 0.275, 60 0.282; edge weight 30 0.288 at 60 with a larger error. At 40 steps on 16 renders the
#: latents moved 50% of their spread; a pull of 0.01 (mean square over their variance) halves that
#: for 0.268 instead of 0.275, 0.03 gives 0.258. Each step decodes and back-propagates the batch:
#: ~1.1 s for 32 scenes on 2 CPU cores.
SHARPEN_STEPS, SHARPEN_LR, SHARPEN_EDGE_WEIGHT, SHARPEN_PULL = 40, 0.3, 10.0, 0.01
#: Each scene of the refiner's latent pool is drawn about this many times, with fresh noise and
#: timesteps: sharpening a scene costs 40 decoder passes and back-propagations (2.2 s a scene on
#: 2 CPU cores), so the pool is small and reused often.
REFINER_REUSE = 96
#: Half-width range, in pixels, of the edge ramp of the VAE's soft-edged renders when
#: `--vae-soft-share` asks for them: from just past a render's anti-aliasing to 5 px.
VAE_SOFT_EDGE_PX = (0.5, 5.0)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


@dataclass
class VaeRecipe:
    """Experiment switches of the VAE stage (issue #16: a VAE whose latents record how soft an edge
    is). The defaults are the shipped recipe; `training.evaluate.vae_softness` scores the result."""

    soft_share: float = 0.0  # share of the normal (not pastel) renders drawn with soft edges
    slope_weight: float = 0.0  # weight of an L1 loss on Sobel gradients (edges are a few pixels)
    widths: tuple[int, ...] | None = None  # block_out_channels; None: configs/models/tiny/vae's
    decode_mean: bool = False  # decode the posterior mean in training, not a sample of it
    # Hold a soft render's latent mean this far (mean square, scaled by its ramp over the softest)
    # from its crisp render's: the encoder then records softness, which six VAEs trained on the
    # reconstruction loss alone kept a fifteenth to a thirtieth of (needs soft_share).
    soft_margin: float = 0.0

    def __post_init__(self):
        if self.soft_margin and not self.soft_share:
            raise ValueError(f"soft_margin {self.soft_margin} needs soft_share above 0 (it holds soft renders apart from crisp ones)")


@dataclass
class StageConfig:
    steps: int
    batch: int
    lr: float
    warmup: int


DEFAULTS = {
    "vae": StageConfig(steps=2000, batch=32, lr=1e-3, warmup=200),
    "base": StageConfig(steps=6000, batch=256, lr=5e-4, warmup=300),
    "controlnet": StageConfig(steps=3000, batch=256, lr=1e-3, warmup=100),
    "silhouette": StageConfig(steps=3000, batch=256, lr=1e-3, warmup=100),
    "lora": StageConfig(steps=400, batch=256, lr=1e-3, warmup=50),
    "refiner": StageConfig(steps=3000, batch=256, lr=5e-4, warmup=100),
}
#: Smaller batches and fewer steps for a 2-core CPU: about 2.6 hours by the step times measured
#: there (README). Not validated: a shorter version (VAE 800 x 8, UNet 3000 x 32) drew a weak model.
#: The shipped weights come from the GPU profile.
CPU_PROFILE = {
    "vae": StageConfig(steps=1500, batch=8, lr=1e-3, warmup=100),
    "base": StageConfig(steps=5000, batch=64, lr=5e-4, warmup=200),
    "controlnet": StageConfig(steps=1500, batch=32, lr=1e-3, warmup=100),
    "silhouette": StageConfig(steps=1500, batch=32, lr=1e-3, warmup=100),
    "lora": StageConfig(steps=300, batch=32, lr=1e-3, warmup=30),
    "refiner": StageConfig(steps=4500, batch=32, lr=5e-4, warmup=100),
}
SMOKE = {name: StageConfig(steps=2, batch=2, lr=cfg.lr, warmup=1) for name, cfg in DEFAULTS.items()}
PROFILES = {"gpu": DEFAULTS, "cpu": CPU_PROFILE}


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # every step has the same shapes
    configs = {name: _stage_config(name, args) for name in STAGES}
    budgets = _budgets(args.budget_s)
    try:
        vae_recipe = VaeRecipe(args.vae_soft_share, args.vae_slope_weight, args.vae_widths, args.vae_decode_mean, args.vae_soft_margin)
    except ValueError as error:
        raise SystemExit(f"--vae-soft-margin: {error}") from None
    trainer = Trainer(Path(args.out), device, args.seed, args.resolution, budgets, vae_recipe)
    report = {"command": "python -m training.train_tiny " + " ".join(argv if argv is not None else sys.argv[1:])}
    report["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report["torch"] = torch.__version__
    report["stages"] = {}
    for name in STAGES:
        if name in args.stages:
            report["stages"][name] = {"config": asdict(configs[name]), **getattr(trainer, f"train_{name}")(configs[name])}
    trainer.save_report(report)
    return report


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="root to write models/ and loras/ under (`configs` for the shipped weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=128, help="training image side (a multiple of 8)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(DEFAULT_STAGES))
    parser.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="gpu",
        help="steps and batches per stage: gpu (the shipped recipe) or cpu (~2.6 h on 2 cores, not validated)",
    )
    parser.add_argument("--smoke", action="store_true", help="2 steps of batch 2 per stage: checks the path, trains nothing")
    parser.add_argument(
        "--budget-s",
        nargs="+",
        default=[],
        metavar="STAGE=SECONDS",
        help="fit a stage into a time budget: timed over steps 20-70, its step count then shrinks to fit",
    )
    parser.add_argument("--vae-soft-share", type=float, default=0.0, help="share of the VAE's normal renders drawn with soft edges")
    parser.add_argument("--vae-slope-weight", type=float, default=0.0, help="weight of the VAE loss's Sobel-gradient term")
    parser.add_argument(
        "--vae-widths",
        type=lambda text: tuple(int(width) for width in text.split(",")),
        help="the VAE's block_out_channels, e.g. 32,64,128,128 (a new VAE only; default: its config's)",
    )
    parser.add_argument(
        "--vae-decode-mean",
        action="store_true",
        help="train the VAE's decoder on the posterior mean, not a sample of it (probed: no better at recording soft edges; README, \"The tiny refiner\")",
    )
    parser.add_argument(
        "--vae-soft-margin",
        type=float,
        default=0.0,
        help="hold a soft render's latent mean this far (mean square at the softest ramp, e.g. 0.5; the shipped "
        "VAE's latents have a variance of ~10) from its crisp render's; needs --vae-soft-share (a CPU fine-tune: no wider "
        "separation, blurrier; not yet run on a GPU; README, \"The tiny refiner\")",
    )
    for name in STAGES:
        parser.add_argument(f"--{name}-steps", type=int)
        parser.add_argument(f"--{name}-batch", type=int)
    args = parser.parse_args(argv)
    if args.resolution % 8 or args.resolution < 32:
        parser.error(f"--resolution {args.resolution} must be a multiple of 8, at least 32")
    return args


def _budgets(items: list[str]) -> dict[str, float]:
    budgets = {}
    for item in items:
        stage, _, seconds = item.partition("=")
        if stage not in STAGES or not seconds.replace(".", "", 1).isdigit():
            raise SystemExit(f"--budget-s {item!r}: expected STAGE=SECONDS with STAGE one of {', '.join(STAGES)}")
        budgets[stage] = float(seconds)
    return budgets


def _stage_config(name: str, args) -> StageConfig:
    config = (SMOKE if args.smoke else PROFILES[args.profile])[name]
    steps = getattr(args, f"{name}_steps") or config.steps
    batch = getattr(args, f"{name}_batch") or config.batch
    return StageConfig(steps=steps, batch=batch, lr=config.lr, warmup=min(config.warmup, steps))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stable_seed(*parts) -> int:
    # Python's hash() of strings changes between processes; crc32 does not.
    return zlib.crc32(":".join(map(str, parts)).encode())


@dataclass
class Batch:
    scene: shapes.Scene  # on the device
    ids: torch.Tensor  # (B, 77) caption token ids, on the device
    drop: torch.Tensor  # (B,) bool: caption replaced by zero embeddings (classifier-free guidance)


class BatchStream:
    """One stage's batches, prepared `CHUNK` steps at a time on the CPU (scenes, captions, token
    ids) and moved to the device in one copy: a copy every step would make the CPU wait for the
    GPU every step. Deterministic from (seed, stage, chunk), whatever the number of steps."""

    CHUNK = 50
    #: Share of captions dropped to the unconditional input.
    DROP_CAPTION = 0.1

    def __init__(self, trainer: "Trainer", stage: str, batch: int, drop_layout: float):
        self.trainer, self.stage, self.batch, self.drop_layout = trainer, stage, batch, drop_layout
        self._chunk_index, self._chunk = -1, None

    def __call__(self, step: int) -> Batch:
        index, offset = divmod(step, self.CHUNK)
        if index != self._chunk_index:
            self._chunk_index, self._chunk = index, self._prepare(index)
        scene, ids, drop = self._chunk
        rows = slice(offset * self.batch, (offset + 1) * self.batch)
        return Batch(scene.rows(rows.start, rows.stop), ids[rows], drop[rows])

    def _prepare(self, index: int):
        generator = torch.Generator().manual_seed(_stable_seed(self.trainer.seed, self.stage, index))
        n = self.CHUNK * self.batch
        scene = shapes.sample_scenes(n, generator)
        keep = torch.rand(n, 2, generator=generator) >= self.drop_layout
        captions = [shapes.caption(scene, i, with_size=bool(keep[i, 0]), with_position=bool(keep[i, 1])) for i in range(n)]
        ids = self.trainer.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        drop = torch.rand(n, generator=generator) < self.DROP_CAPTION
        device = self.trainer.device
        return scene.to(device), ids.to(device), drop.to(device)


@dataclass
class LatentPool:
    """The refiner's scenes, as the frozen VAE encodes them and sharpened (`Trainer.latent_pool`)."""

    mean: torch.Tensor  # (N, 4, h, w) the renders' posterior means: what the base draws
    std: torch.Tensor  # (N, 4, h, w) the posterior's standard deviations
    sharpened: torch.Tensor  # (N, 4, h, w) `Trainer.sharpened_latents` of `mean`
    ids: torch.Tensor  # (N, 77) caption token ids


@dataclass
class RefinerBatch:
    """One refiner training batch (`Trainer.refiner_batch`): the sharp-scored rows, then the same
    scenes scored as the base's look."""

    noisy: torch.Tensor  # (2B, 4, h, w) the base-look latents noised, twice
    steps: torch.Tensor  # (2B,) timesteps
    embeds: torch.Tensor  # (2B, 77, C) text_encoder_2's penultimate states
    added: dict  # SDXL's added conditions: pooled text and time ids with the aesthetic score
    target: torch.Tensor  # (2B, 4, h, w) the epsilon to predict


class Trainer:
    """Holds the components between stages and writes each stage's result as soon as it ends."""

    def __init__(
        self, out: Path, device: torch.device, seed: int, resolution: int, budgets: dict[str, float], vae_recipe: VaeRecipe = VaeRecipe()
    ):
        self.out = out
        self.vae_recipe = vae_recipe
        self.device = device
        self.seed = seed
        self.resolution = resolution
        self.budgets = budgets
        self.model_dir = out / "models" / "tiny"
        self.tokenizer = byte_level_tokenizer()
        self.empty_ids = self.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
        self._pipe: StableDiffusionXLPipeline | None = None
        self.noise_scheduler = DDPMScheduler.from_pretrained(MODEL_CONFIG_ROOT / "tiny", subfolder="scheduler")

    # -- components ---------------------------------------------------------------------------

    @property
    def pipe(self) -> StableDiffusionXLPipeline:
        """The pipeline being trained: from `--out` when an earlier run wrote it, else seeded random."""
        if self._pipe is None:
            if (self.model_dir / "model_index.json").exists():
                pipe = StableDiffusionXLPipeline.from_pretrained(self.model_dir, dtype=torch.float32)
                widths = self.vae_recipe.widths
                if widths and list(widths) != list(pipe.vae.config.block_out_channels):
                    raise SystemExit(f"--vae-widths {','.join(map(str, widths))}: {self.model_dir} already holds a VAE of {pipe.vae.config.block_out_channels}")
            else:
                pipe = build_random_pipeline(MODEL_CONFIG_ROOT / "tiny", self.seed, torch.device("cpu"), torch.float32)
                if self.vae_recipe.widths:
                    torch.manual_seed(self.seed)
                    pipe.register_modules(vae=AutoencoderKL.from_config(pipe.vae.config, block_out_channels=list(self.vae_recipe.widths)))
            self._pipe = pipe.to(self.device)
        return self._pipe

    def save_pipeline(self) -> None:
        self.pipe.save_pretrained(self.model_dir, safe_serialization=True)

    def save_report(self, report: dict) -> None:
        path = self.out / "models" / "tiny-training.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(path.read_text()) if path.exists() else {}
        # Stages not run this time keep their earlier record; `runs` lists every command in order
        # (a stage run again continues from the weights the earlier runs wrote).
        runs = previous.get("runs", []) + [{k: report[k] for k in ("command", "device", "torch")} | {"stages": list(report["stages"])}]
        merged = {**previous, **report, "runs": runs, "stages": {**previous.get("stages", {}), **report["stages"]}}
        path.write_text(json.dumps(merged, indent=2) + "\n")

    # -- data ---------------------------------------------------------------------------------

    def stream(self, stage: str, batch: int, drop_layout: float = 0.0) -> "BatchStream":
        return BatchStream(self, stage, batch, drop_layout)

    def encode_text(self, batch: "Batch") -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's prompt embeddings: penultimate hidden states of both encoders, pooled from the
        second; dropped captions become zeros, the pipeline's unconditional input."""
        first = self.pipe.text_encoder(batch.ids, output_hidden_states=True)
        second = self.pipe.text_encoder_2(batch.ids, output_hidden_states=True)
        embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds
        keep = (~batch.drop).to(embeds.dtype)
        return embeds * keep[:, None, None], pooled * keep[:, None]

    def encode_text_2(self, ids: torch.Tensor, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The refiner's prompt embeddings: text_encoder_2's penultimate hidden states and pooled
        output. Dropped captions become the empty caption's: with ``force_zeros_for_empty_prompt``
        false, as in SDXL's refiner, that is what the pipeline feeds as the unconditional input."""
        ids = torch.where(drop[:, None], self.empty_ids, ids)
        output = self.pipe.text_encoder_2(ids, output_hidden_states=True)
        return output.hidden_states[-2], output.text_embeds

    def refiner_time_ids(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, 5): original height and width, crop top and left, aesthetic score, in the order of
        ``StableDiffusionXLImg2ImgPipeline._get_add_time_ids`` with ``requires_aesthetics_score``."""
        side = float(self.resolution)
        fixed = torch.tensor([side, side, 0.0, 0.0], device=self.device).expand(len(scores), -1)
        return torch.cat([fixed, scores[:, None]], dim=1)

    def time_ids(self, batch: int) -> torch.Tensor:
        side = float(self.resolution)
        return torch.tensor([[side, side, 0.0, 0.0, side, side]], device=self.device).expand(batch, -1)

    @torch.no_grad()
    def latents(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        vae = self.pipe.vae
        dist = vae.encode(images * 2 - 1).latent_dist
        noise = torch.randn(dist.mean.shape, generator=generator, device=self.device)
        return (dist.mean + dist.std * noise) * vae.config.scaling_factor

    def noisy(self, latents: torch.Tensor, generator: torch.Generator, early_steps: bool = False):
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        # Offset noise: SDXL's schedule leaves some signal at the last timestep, and in a world of
        # flat backgrounds that leftover mean *is* the background colour. Without the offset the
        # model learns to read the colour from it, and at inference (pure noise) draws the
        # colour of the noise's mean instead of the prompt's (measured: 17% right backgrounds).
        noise = noise + NOISE_OFFSET * torch.randn(*latents.shape[:2], 1, 1, generator=generator, device=self.device)
        total = self.noise_scheduler.config.num_train_timesteps
        if early_steps:
            # Cubic sampling toward high noise (T2I-Adapter, Mou et al. 2023): layout is decided
            # in the first, noisiest steps, where the epsilon loss barely sees it.
            u = torch.rand(len(latents), generator=generator, device=self.device)
            steps = ((1 - u**3) * total).long().clamp(max=total - 1)
        else:
            steps = torch.randint(0, total, (len(latents),), generator=generator, device=self.device)
        return self.noise_scheduler.add_noise(latents, noise, steps), noise, steps

    def diffusion_loss(
        self, batch: "Batch", images: torch.Tensor, generator: torch.Generator, controlnet=None, control=None
    ) -> torch.Tensor:
        """SDXL's objective on one batch: predict the noise added at a random timestep (uniform;
        drawn toward high noise when training a ControlNet on the `control` maps (B, 3, H, W))."""
        embeds, pooled = self.encode_text(batch)
        noisy, noise, steps = self.noisy(self.latents(images, generator), generator, early_steps=controlnet is not None)
        added = {"text_embeds": pooled, "time_ids": self.time_ids(len(images))}
        residuals = {}
        if controlnet is not None:
            down, mid = controlnet(noisy, steps, embeds, controlnet_cond=control, added_cond_kwargs=added, return_dict=False)
            residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        predicted = self.pipe.unet(noisy, steps, embeds, added_cond_kwargs=added, **residuals).sample
        per_item = F.mse_loss(predicted.float(), noise, reduction="none").mean(dim=(1, 2, 3))
        return (per_item * self.min_snr_weights(steps)).mean()

    @torch.no_grad()
    def latent_pool(self, size: int, chunk: int = 64) -> LatentPool:
        """`size` training scenes (rounded up to `chunk`), each as the base draws it (the frozen
        VAE's posterior of the render) and sharpened (`sharpened_latents` of that posterior's mean)."""
        stream = self.stream("refiner", chunk, drop_layout=0.2)
        means, stds, sharpened, ids = [], [], [], []
        for step in range(math.ceil(size / chunk)):
            batch = stream(step)
            images = shapes.render(batch.scene, self.resolution)
            dist = self.pipe.vae.encode(images * 2 - 1).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
            sharpened.append(self.sharpened_latents(images, dist.mean))
            ids.append(batch.ids)
            logger.info("refiner pool: %d/%d scenes", (step + 1) * chunk, math.ceil(size / chunk) * chunk)
        return LatentPool(torch.cat(means), torch.cat(stds), torch.cat(sharpened), torch.cat(ids))

    @torch.enable_grad()
    def sharpened_latents(self, images: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Latents the frozen decoder draws `images` (B, 3, H, W) from with sharper edges than the
        encoder's: Adam from the encoder's mean `start` on the decoded image's squared error, the
        pixels near an edge weighted SHARPEN_EDGE_WEIGHT + 1 times, pulled toward `start` by
        SHARPEN_PULL. The encoder keeps almost nothing of an edge's profile and the base draws what
        it keeps (README, "The tiny refiner"), so these latents are what a refiner can add: 16
        held-out renders' round trips measure 0.233 (`judge.edge_sharpness`; renders 0.43), their
        sharpened latents 0.268 at 56% of the error."""
        decoder = self.pipe.vae
        gradient = judge.sobel(images).abs().sum(dim=1, keepdim=True)
        band = F.max_pool2d((gradient > 0.01).float(), 5, stride=1, padding=2)  # within 2 px of an edge
        latents = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([latents], lr=SHARPEN_LR)
        for _ in range(SHARPEN_STEPS):
            error = (decoder.decode(latents).sample / 2 + 0.5 - images).pow(2)
            pull = (latents - start).pow(2).mean() / start.var()
            loss = error.mean() + SHARPEN_EDGE_WEIGHT * (error * band).mean() + SHARPEN_PULL * pull
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return latents.detach()

    def refiner_loss(self, unet, pool: LatentPool, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The refiner's objective on `refiner_batch`: epsilon, min-SNR weights."""
        batch = self.refiner_batch(pool, rows, generator)
        predicted = unet(batch.noisy, batch.steps, batch.embeds, added_cond_kwargs=batch.added).sample
        per_item = F.mse_loss(predicted.float(), batch.target, reduction="none").mean(dim=(1, 2, 3))
        return (per_item * self.min_snr_weights(batch.steps)).mean()

    def refiner_batch(self, pool: LatentPool, rows: torch.Tensor, generator: torch.Generator) -> RefinerBatch:
        """The refiner's inputs and targets at a timestep below REFINER_TIMESTEPS, conditioned on
        text_encoder_2 and an aesthetic score. Each scene of `rows` comes twice with the same
        input, its base-look latents noised (what the base hands over): scored SHARP_SCORE, the
        target is the noise that moves it 1 / REFINER_GUIDANCE of the way to its sharpened
        latents; scored SOFT_SCORE, the noise added (plain denoising). Guidance takes the score's
        difference g times (SOFT_SCORE is the unconditional half's), so at the default scale the
        step lands on the sharpened latents, and guidance 1 takes a fifth of it.

        Plain denoising of the sharpened latents was tried first (CPU pilot, 128 scenes, 600
        steps): the refiner drew softer images than the base (0.207 vs 0.231) and lost colours:
        those latents sit 45% of the latents' spread off the base's, and a refiner that never sees
        the base's kind of latents learns nothing about moving them. Then this target without the
        1 / REFINER_GUIDANCE (1000 steps): sharper at guidance 1 (0.256, 8 of 8), but guidance 5
        took the step five times over and lost every foreground colour."""
        scale = self.pipe.vae.config.scaling_factor
        mean = pool.mean[rows]
        drawn = (mean + pool.std[rows] * torch.randn(mean.shape, generator=generator, device=self.device)) * scale
        drop = torch.rand(len(rows), generator=generator, device=self.device) < BatchStream.DROP_CAPTION
        embeds, pooled = self.encode_text_2(pool.ids[rows], drop)
        # No offset noise. It serves the first step, which starts from pure noise whose mean holds
        # no colour while training's last timestep leaves the background's in (see `noisy`). The
        # refiner never starts there: it continues the base's latents at t < 200 (signal-to-noise
        # 3 and up), whose colours are decided, and an offset would teach it to take a shift of the
        # whole image's colour for noise to remove, i.e. to recolour what the base drew.
        noise = torch.randn(drawn.shape, generator=generator, device=self.device)
        steps = torch.randint(0, REFINER_TIMESTEPS, (len(rows),), generator=generator, device=self.device)
        noisy = self.noise_scheduler.add_noise(drawn, noise, steps)
        alphas = self.noise_scheduler.alphas_cumprod.to(self.device)[steps][:, None, None, None]
        sharpening = (pool.sharpened[rows] - mean) * scale / REFINER_GUIDANCE
        to_sharp = noise - (alphas / (1 - alphas)).sqrt() * sharpening
        scores = torch.tensor([SHARP_SCORE, SOFT_SCORE], device=self.device).repeat_interleave(len(rows))
        added = {"text_embeds": pooled.repeat(2, 1), "time_ids": self.refiner_time_ids(scores)}
        return RefinerBatch(noisy.repeat(2, 1, 1, 1), steps.repeat(2), embeds.repeat(2, 1, 1), added, torch.cat([to_sharp, noise]))

    def min_snr_weights(self, steps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
        # Min-SNR weighting (Hang et al. 2023) for epsilon prediction: converges in fewer steps.
        alphas = self.noise_scheduler.alphas_cumprod.to(self.device)[steps]
        snr = alphas / (1 - alphas)
        return snr.clamp(max=gamma) / snr

    # -- stages -------------------------------------------------------------------------------

    def vae_loss(self, vae: AutoencoderKL, scene: shapes.Scene, generator: torch.Generator) -> torch.Tensor:
        """The VAE's objective on renders of `scene`: L1 + MSE of the decoded sample (a KL term
        of 1e-6 keeps the latents near a unit Gaussian), with the `vae_recipe` switches."""
        batch, recipe = len(scene), self.vae_recipe
        # A third pastel, so the LoRA's colours stay within what the decoder can draw.
        pastel = torch.rand(batch, generator=generator, device=self.device) < 1 / 3
        images = torch.where(
            pastel[:, None, None, None],
            shapes.render(scene, self.resolution, pastel=True),
            shapes.render(scene, self.resolution),
        )
        crisp = images
        if recipe.soft_share:
            low, high = VAE_SOFT_EDGE_PX
            soft = ~pastel & (torch.rand(batch, generator=generator, device=self.device) < recipe.soft_share)
            widths = low + (high - low) * torch.rand(batch, generator=generator, device=self.device)
            images = torch.where(soft[:, None, None, None], shapes.soft_render(scene, widths, self.resolution), images)
        dist = vae.encode(images * 2 - 1).latent_dist
        if recipe.decode_mean:
            decoded = vae.decode(dist.mean).sample.float()
        else:
            noise = torch.randn(dist.mean.shape, generator=generator, device=self.device)
            decoded = vae.decode(dist.mean + dist.std * noise).sample.float()
        target = images * 2 - 1
        kl = dist.kl().mean() / dist.mean[0].numel()
        loss = F.l1_loss(decoded, target) + F.mse_loss(decoded, target) + 1e-6 * kl
        if recipe.slope_weight:
            loss = loss + recipe.slope_weight * F.l1_loss(judge.sobel(decoded), judge.sobel(target))
        if recipe.soft_margin and soft.any():
            crisp_mean = vae.encode(crisp[soft] * 2 - 1).latent_dist.mean
            apart = (dist.mean[soft] - crisp_mean).pow(2).mean(dim=(1, 2, 3))
            loss = loss + F.relu(recipe.soft_margin * widths[soft] / high - apart).mean()
        return loss

    def train_vae(self, config: StageConfig) -> dict:
        vae: AutoencoderKL = self.pipe.vae
        vae.train().requires_grad_(True)
        stream = self.stream("vae", config.batch)

        def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
            return self.vae_loss(vae, stream(step).scene, generator)

        result = self._optimize("vae", list(vae.parameters()), loss_fn, config)
        vae.eval().requires_grad_(False)
        result["scaling_factor"] = self._calibrate_latent_scale()
        self.save_pipeline()
        return result

    @torch.no_grad()
    def _calibrate_latent_scale(self) -> float:
        generator = torch.Generator().manual_seed(self.seed)
        scene = shapes.sample_scenes(512, generator).to(self.device)
        images = shapes.render(scene, self.resolution)
        std = float(self.pipe.vae.encode(images * 2 - 1).latent_dist.mean.std())
        self.pipe.vae.register_to_config(scaling_factor=1.0 / std)
        return 1.0 / std

    def train_base(self, config: StageConfig) -> dict:
        pipe = self.pipe
        pipe.vae.eval().requires_grad_(False)
        trained = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
        for module in trained:
            module.train().requires_grad_(True)
        params = [p for module in trained for p in module.parameters()]
        stream = self.stream("base", config.batch, drop_layout=0.2)

        def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
            batch = stream(step)
            return self.diffusion_loss(batch, shapes.render(batch.scene, self.resolution), generator)

        result = self._optimize("base", params, loss_fn, config, ema_modules=trained)
        for module in trained:
            module.eval().requires_grad_(False)
        self.save_pipeline()
        return result

    def train_controlnet(self, config: StageConfig) -> dict:
        """The canny ControlNet: edges of the render."""
        return self._train_control("controlnet", "tiny-controlnet-canny", lambda batch, images: canny(images), config)

    def train_silhouette(self, config: StageConfig) -> dict:
        """The silhouette ControlNet: the shape's area, white on black (no colour, no edges drawn)."""
        return self._train_control(
            "silhouette", "tiny-controlnet-silhouette", lambda batch, images: shapes.silhouette(batch.scene, self.resolution), config
        )

    def _train_control(self, stage: str, folder: str, control_of, config: StageConfig) -> dict:
        """A ControlNet copied from the trained UNet, on `control_of(batch, images)` maps (B, 1, H, W)."""
        self._freeze_pipeline()
        torch.manual_seed(self.seed)
        controlnet = ControlNetModel.from_unet(self.pipe.unet, conditioning_embedding_out_channels=(16, 32, 64, 64))
        # The paper zero-initialises both ends of the control path, so no gradient reaches the
        # edge encoder until the output convolutions have grown: a slow start that cost this
        # tiny model its whole first run (edge recall 0.12). A normal init of the encoder's last
        # layer keeps the output convolutions at zero, so the ControlNet still starts as a no-op.
        controlnet.controlnet_cond_embedding.conv_out.reset_parameters()
        controlnet.to(self.device).train()
        # Most captions lose their layout words: the map must carry position and size.
        stream = self.stream(stage, config.batch, drop_layout=0.8)

        def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
            batch = stream(step)
            images = shapes.render(batch.scene, self.resolution)
            control = control_of(batch, images).expand(-1, 3, -1, -1)
            return self.diffusion_loss(batch, images, generator, controlnet=controlnet, control=control)

        # No weight average here: control is learned late and suddenly, and an average over the
        # run would mostly hold the weights from before it was.
        result = self._optimize(stage, list(controlnet.parameters()), loss_fn, config)
        controlnet.eval()
        controlnet.save_pretrained(self.out / "models" / folder, safe_serialization=True)
        return result

    def train_lora(self, config: StageConfig) -> dict:
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        pipe = self.pipe
        self._freeze_pipeline()
        torch.manual_seed(self.seed)
        pipe.unet.add_adapter(
            LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS),
            adapter_name="pastel",
        )
        params = [p for p in pipe.unet.parameters() if p.requires_grad]
        stream = self.stream("lora", config.batch, drop_layout=0.2)

        def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
            batch = stream(step)
            return self.diffusion_loss(batch, shapes.render(batch.scene, self.resolution, pastel=True), generator)

        pipe.unet.train()
        result = self._optimize("lora", params, loss_fn, config)
        pipe.unet.eval()
        # PEFT key names as they are: diffusers' conversion renames only the attention
        # keys to its older format, and a file mixing both formats loads without them.
        layers = get_peft_model_state_dict(pipe.unet, adapter_name="pastel")
        StableDiffusionXLPipeline.save_lora_weights(
            self.out / "loras", unet_lora_layers=layers, weight_name="pastel.safetensors", safe_serialization=True
        )
        pipe.unet.delete_adapters("pastel")
        return result

    def train_refiner(self, config: StageConfig) -> dict:
        """SDXL's refiner for the frozen base; a batch holds `config.batch` / 2 scenes of a latent
        pool, each as the base draws it and sharpened (`refiner_loss`)."""
        self._freeze_pipeline()
        started = time.perf_counter()
        pool = self.latent_pool(max(1, config.steps * (config.batch // 2) // REFINER_REUSE))
        _synchronize(self.device)
        pool_s = time.perf_counter() - started
        if "refiner" in self.budgets:
            self.budgets["refiner"] -= pool_s  # a time budget covers the pool's sharpening too
        unet = self._refiner_unet().to(self.device).train()

        def loss_fn(step: int, generator: torch.Generator) -> torch.Tensor:
            rows = torch.randint(len(pool.ids), (config.batch // 2,), generator=generator, device=self.device)
            return self.refiner_loss(unet, pool, rows, generator)

        result = self._optimize("refiner", list(unet.parameters()), loss_fn, config, ema_modules=[unet])
        unet.eval().requires_grad_(False)
        self._save_refiner(unet)
        result |= {"pool_scenes": len(pool.ids), "pool_seconds": round(pool_s, 1), "parameters": sum(p.numel() for p in unet.parameters())}
        return result

    def _refiner_unet(self) -> UNet2DConditionModel:
        """The base UNet's blocks with SDXL's refiner conditioning: cross-attention on
        text_encoder_2's hidden states alone, and five time ids, the last the aesthetic score."""
        base = self.pipe.unet
        encoder = self.pipe.text_encoder_2.config
        id_width = base.config.addition_time_embed_dim
        config = dict(
            base.config,
            cross_attention_dim=encoder.hidden_size,
            projection_class_embeddings_input_dim=encoder.projection_dim + 5 * id_width,
        )
        torch.manual_seed(self.seed)
        unet = UNet2DConditionModel.from_config(config)
        # Every weight of the base whose shape fits; the added embedding's first layer and the
        # cross-attention keys keep their fresh init, and the values start at zero, so that
        # cross-attention starts as a no-op. This stage's loss at the start, on 128 scene pairs:
        # 0.020; with fresh values 0.026; with values from the base's text_encoder_2 columns 0.040,
        # or those plus its text_encoder columns applied to text_encoder's states fitted from
        # text_encoder_2's (least squares, 26% of the variance left) 0.053: an approximate text
        # signal does worse than none.
        shapes_now = {key: value.shape for key, value in unet.state_dict().items()}
        unet.load_state_dict({k: v for k, v in base.state_dict().items() if shapes_now[k] == v.shape}, strict=False)
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_v"):
                torch.nn.init.zeros_(module.weight)
        return unet

    def _save_refiner(self, unet: UNet2DConditionModel) -> None:
        """``model_index.json``, ``unet/`` and ``scheduler/``, as SDXL's refiner repository holds
        them less the VAE and text encoder it shares with the base (the loader passes those in)."""
        folder = self.out / "models" / "tiny-refiner"
        pipe = self.pipe
        refiner = StableDiffusionXLImg2ImgPipeline(
            vae=pipe.vae,
            text_encoder=None,
            text_encoder_2=pipe.text_encoder_2,
            tokenizer=None,
            tokenizer_2=pipe.tokenizer_2,
            unet=unet,
            scheduler=pipe.scheduler,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )
        refiner.save_config(folder)  # model_index.json, diffusers' own entries
        unet.save_pretrained(folder / "unet", safe_serialization=True)
        pipe.scheduler.save_pretrained(folder / "scheduler")

    def _freeze_pipeline(self) -> None:
        for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder, self.pipe.text_encoder_2):
            module.eval().requires_grad_(False)

    # -- the loop -----------------------------------------------------------------------------

    def _optimize(self, stage, params, loss_fn, config: StageConfig, ema_modules=None) -> dict:
        """AdamW with warm-up and cosine decay; with `ema_modules`, their weights end as an
        exponential moving average of the trajectory (smoother samples after short runs)."""
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.01, fused=fused)

        def lr_at(step: int) -> float:
            if step < config.warmup:
                return (step + 1) / config.warmup
            progress = (step - config.warmup) / max(1, config.steps - config.warmup)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
        ema_params = [p for m in ema_modules for p in m.parameters()] if ema_modules else []
        shadow = [p.detach().clone() for p in ema_params]
        # Noise and timesteps come from a generator on the device: drawing them on the CPU and
        # copying would make the CPU wait for the GPU every step.
        generator = torch.Generator(self.device).manual_seed(_stable_seed(self.seed, stage))
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        losses, started, step, mark = [], time.perf_counter(), 0, 0.0
        for step in range(config.steps):  # config.steps may shrink once (time budget)
            with autocast:
                loss = loss_fn(step, generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            if shadow:
                decay = min(0.999, (1 + step) / (10 + step))
                torch._foreach_lerp_(shadow, [p.detach() for p in ema_params], 1 - decay)
            losses.append(loss.detach())
            if (step + 1) % 250 == 0 or step + 1 == config.steps:
                recent = torch.stack(losses[-250:]).mean().item()
                logger.info("%s step %d/%d loss %.4f (%.1f s)", stage, step + 1, config.steps, recent, time.perf_counter() - started)
            if stage in self.budgets and step == 19:
                _synchronize(self.device)
                mark = time.perf_counter()
            elif stage in self.budgets and step == 69:
                # Timed over steps 20-70, past the first steps' one-off costs. The warm-up and
                # cosine schedule follow the shrunk count, so the run still ends at the low rate.
                _synchronize(self.device)
                per_step = (time.perf_counter() - mark) / 50
                fitted = 70 + int((self.budgets[stage] - (time.perf_counter() - started)) / per_step)
                if fitted < config.steps:
                    logger.warning("%s: %d steps fit %.0f s at %.3f s/step (asked %d)", stage, fitted, self.budgets[stage], per_step, config.steps)
                    config.steps = fitted
                    config.warmup = min(config.warmup, fitted // 10)
            if step + 1 >= config.steps:
                break
        with torch.no_grad():
            for target, average in zip(ema_params, shadow):
                target.copy_(average)
        history = torch.stack(losses).float().cpu()
        seconds = time.perf_counter() - started
        return {
            "steps_run": step + 1,
            "seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / (step + 1), 4),
            "loss_first_100": round(history[:100].mean().item(), 5),
            "loss_last_100": round(history[-100:].mean().item(), 5),
        }


if __name__ == "__main__":
    main()
