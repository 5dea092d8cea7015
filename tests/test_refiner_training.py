"""The tiny refiner: the sharpness ruler it is judged by, the stage that trains it (its sharpened
targets and the guided step they set), the shipped folder loading with the base's shared parts
exactly as the README's loader call does, and the VAE switches and measure of the experiment
toward a VAE that records soft edges (#16)."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from configs.model_spec import TINY_MODEL_DIR, TINY_REFINER_DIR
from training import judge, shapes
from training.evaluate import vae_softness
from training.train_tiny import REFINER_GUIDANCE, SHARP_SCORE, SOFT_SCORE, LatentPool, Trainer, main as train_main


def _blur(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(images, (size // 2,) * 4, mode="replicate"), size, stride=1)


def test_edge_sharpness_ranks_renders_above_softened_ones_and_ignores_noise():
    scene = shapes.sample_scenes(16, torch.Generator().manual_seed(0), held_out=True)
    images = shapes.render(scene)
    noise = 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    sharp, soft, softer = (judge.edge_sharpness(x) for x in (images, _blur(images, 3), _blur(images, 7)))
    assert 0.4 < sharp.mean() < 0.5  # one pixel of anti-aliasing: about half the contrast per pixel
    assert (sharp > soft + 0.1).all() and (soft > softer + 0.05).all()
    assert (judge.edge_sharpness(shapes.soft_render(scene, torch.full((16,), 3.0), 128)) < sharp - 0.15).all()
    assert (judge.edge_sharpness((images + noise).clamp(0, 1)) - sharp).abs().max() < 0.05
    assert (judge.edge_sharpness((_blur(images, 3) + noise).clamp(0, 1)) < sharp - 0.1).all()


def test_soft_renders_keep_the_outline():
    """Soft edges without moving the outline: the pixels at least half way to the shape's colour
    are the silhouette's, the ramp reaches past it, and every shape still reads as itself."""
    scene = shapes.sample_scenes(16, torch.Generator().manual_seed(2))
    soft = shapes.soft_render(scene, torch.full((16,), 5.0), 128)
    foreground, background = (shapes.palette()[index][:, :, None, None] for index in (scene.colour, scene.background))
    share = ((soft - background) * (foreground - background)).sum(1) / (foreground - background).pow(2).sum(1)
    silhouette = shapes.silhouette(scene)[:, 0] > 0
    assert judge.mask_iou(share >= 0.5, silhouette).min() > 0.95
    assert (share > 0.01).sum() > 1.3 * silhouette.sum()
    assert torch.equal(judge.classify_shapes(soft), scene.shape)


def test_refiner_stage_writes_only_its_folder(tmp_path):
    """Two steps at 64² on a random base: the refiner's folder, and no base pipeline written."""
    report = train_main(["--out", str(tmp_path), "--smoke", "--resolution", "64", "--device", "cpu", "--stages", "refiner"])
    assert set(report["stages"]) == {"refiner"}
    folder = tmp_path / "models" / "tiny-refiner"
    assert sorted(p.name for p in folder.iterdir()) == ["model_index.json", "scheduler", "unet"]
    assert not (tmp_path / "models" / "tiny").exists()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["requires_aesthetics_score"] is True and index["force_zeros_for_empty_prompt"] is False
    assert index["text_encoder"] == [None, None] and index["tokenizer"] == [None, None]
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert (unet["cross_attention_dim"], unet["projection_class_embeddings_input_dim"]) == (64, 5 * 8 + 64)


def test_shipped_refiner_loads_with_the_bases_shared_parts_and_refines_its_latents():
    base = StableDiffusionXLPipeline.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32)
    refiner = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        TINY_REFINER_DIR, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2, vae=base.vae, dtype=torch.float32
    )
    assert refiner.text_encoder is None and refiner.vae is base.vae and refiner.config.requires_aesthetics_score
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    prompt, steps = "a large red circle on a blue background, center", 30
    latents = base(prompt=prompt, num_inference_steps=steps, denoising_end=0.8, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    image = refiner(prompt=prompt, image=latents, denoising_start=0.8, num_inference_steps=steps, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 128, 128)
    foreground, background = judge.dominant_colours(image)
    assert (shapes.COLOUR_NAMES[foreground], shapes.COLOUR_NAMES[background]) == ("red", "blue")
    # The score is read: the low score draws a different image from the same latents.
    low = refiner(
        prompt=prompt, image=latents, denoising_start=0.8, num_inference_steps=steps, output_type="pt",
        aesthetic_score=SOFT_SCORE, generator=torch.Generator().manual_seed(0),
    ).images
    assert not torch.equal(image, low)


def test_sobel_reads_each_channels_slope_both_ways():
    ramp = torch.linspace(0, 1, 9).expand(9, 9)  # rises 1/8 per pixel left to right
    images = torch.stack([ramp, ramp.T, torch.zeros(9, 9)])[None]
    gradients = judge.sobel(images)[0, :, 2:-2, 2:-2]  # away from the replicated border
    assert gradients.shape == (6, 5, 5)  # (x, y) per channel
    expected = [1 / 8, 0.0, 0.0, 1 / 8, 0.0, 0.0]  # channel 0 rises along x, channel 1 along y, channel 2 flat
    for output, value in enumerate(expected):
        assert torch.allclose(gradients[output], torch.full((5, 5), value), atol=1e-6)


def test_vae_recipe_switches_build_and_train_the_vae_asked_for(tmp_path):
    """The #16 experiment switches (soft renders, the slope loss, a wider VAE, decoding the
    posterior mean) run the VAE stage and write the widths asked for; other widths on a folder
    that holds that VAE are refused, not trained as they are."""
    common = ["--out", str(tmp_path), "--smoke", "--resolution", "64", "--device", "cpu", "--stages", "vae"]
    train_main([*common, "--vae-soft-share", "0.5", "--vae-slope-weight", "8", "--vae-widths", "32,64,128,128", "--vae-decode-mean"])
    config = json.loads((tmp_path / "models" / "tiny" / "vae" / "config.json").read_text())
    assert config["block_out_channels"] == [32, 64, 128, 128]
    with pytest.raises(SystemExit, match="--vae-widths 16,32,64,64"):
        train_main([*common, "--vae-widths", "16,32,64,64"])


def test_vae_softness_shows_the_shipped_vae_erases_most_of_an_edges_softness():
    """The measure #16 turns on: renders lose sharpness steeply with their edge ramp, the shipped
    VAE's round trips barely (README, "The tiny refiner")."""
    scores = vae_softness(AutoencoderKL.from_pretrained(TINY_MODEL_DIR / "vae"), shapes.sample_scenes(8, torch.Generator().manual_seed(3), held_out=True))
    assert scores["render_0px"] - scores["render_5px"] > 0.25
    assert abs(scores["round_trip_0px"] - scores["round_trip_5px"]) < 0.05
    assert scores["round_trip_mse"] < 0.005


def test_each_vae_switch_changes_the_vae_loss():
    """The VAE's loss on the same weights, scenes and seed: each switch alone changes it (none is
    accepted and ignored); the slope term only adds."""
    from training.train_tiny import VaeRecipe

    vae = AutoencoderKL.from_pretrained(TINY_MODEL_DIR / "vae")
    scene = shapes.sample_scenes(4, torch.Generator().manual_seed(8))
    recipes = {
        "shipped": VaeRecipe(),
        "soft": VaeRecipe(soft_share=1.0),
        "slope": VaeRecipe(slope_weight=8.0),
        "mean": VaeRecipe(decode_mean=True),
        "margin": VaeRecipe(soft_share=1.0, soft_margin=1.0),
    }
    losses = {}
    with torch.no_grad():
        for name, recipe in recipes.items():
            trainer = Trainer(Path("unused"), torch.device("cpu"), 0, 64, {}, recipe)
            losses[name] = trainer.vae_loss(vae, scene, torch.Generator().manual_seed(0)).item()
    assert len(set(losses.values())) == len(losses), losses
    assert losses["slope"] > losses["shipped"], losses
    # The shipped encoder keeps soft and crisp latents close, so the margin term adds to the loss.
    assert losses["margin"] > losses["soft"], losses


def _shipped_trainer() -> Trainer:
    return Trainer(TINY_MODEL_DIR.parents[1], torch.device("cpu"), 0, 128, {})  # reads the shipped weights, writes nothing


def test_sharpened_latents_decode_sharper_than_the_encoders_at_less_error():
    """The refiner's sharp target: latents the shipped decoder draws the render from with steeper
    edges and a smaller error than the encoder's own latents, the same shapes."""
    trainer = _shipped_trainer()
    scene = shapes.sample_scenes(4, torch.Generator().manual_seed(11), held_out=True)
    images = shapes.render(scene)
    vae = trainer.pipe.vae
    with torch.no_grad():
        start = vae.encode(images * 2 - 1).latent_dist.mean
    sharpened = trainer.sharpened_latents(images, start)
    with torch.no_grad():
        before, after = ((vae.decode(z).sample / 2 + 0.5).clamp(0, 1) for z in (start, sharpened))
    assert judge.edge_sharpness(after).mean() > judge.edge_sharpness(before).mean() + 0.02
    assert F.mse_loss(after, images) < F.mse_loss(before, images)
    assert torch.equal(judge.classify_shapes(after), scene.shape)


def test_refiner_targets_guided_at_the_default_scale_land_on_the_sharpened_latents():
    """Classifier-free guidance at REFINER_GUIDANCE of the two rows' targets (the sharp score
    conditional, the base-look score unconditional) predicts the sharpened latents; the
    base-look rows alone predict the latents they were noised from."""
    trainer = _shipped_trainer()
    generator = torch.Generator().manual_seed(0)
    looks, sharpened = torch.randn(2, 3, 4, 16, 16, generator=generator)
    ids = trainer.tokenizer(["a red circle"] * 3, padding="max_length", max_length=77, return_tensors="pt").input_ids
    pool = LatentPool(mean=looks, std=torch.zeros(3, 4, 16, 16), sharpened=sharpened, ids=ids)
    with torch.no_grad():
        batch = trainer.refiner_batch(pool, torch.arange(3), torch.Generator().manual_seed(1))
    sharp_eps, plain_eps = batch.target.chunk(2)
    noisy, steps = batch.noisy[:3], batch.steps[:3]
    alphas = trainer.noise_scheduler.alphas_cumprod[steps][:, None, None, None]

    def predicted_latents(eps: torch.Tensor) -> torch.Tensor:
        return (noisy - (1 - alphas).sqrt() * eps) / alphas.sqrt() / trainer.pipe.vae.config.scaling_factor

    guided = plain_eps + REFINER_GUIDANCE * (sharp_eps - plain_eps)
    assert torch.allclose(predicted_latents(guided), sharpened, atol=1e-4)
    assert torch.allclose(predicted_latents(plain_eps), looks, atol=1e-4)
    assert torch.equal(batch.noisy[3:], noisy) and torch.equal(batch.steps[3:], steps)  # one input, two scores
    assert batch.added["time_ids"][:, -1].tolist() == [SHARP_SCORE] * 3 + [SOFT_SCORE] * 3
