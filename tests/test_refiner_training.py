"""The tiny refiner: the sharpness ruler it is judged by, the stage that trains it, and the shipped
folder loading with the base's shared parts exactly as the README's loader call does."""

import json

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from configs.model_spec import TINY_MODEL_DIR, TINY_REFINER_DIR
from training import judge, shapes
from training.train_tiny import SOFT_SCORE, main as train_main, soft_render


def _blur(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(images, (size // 2,) * 4, mode="replicate"), size, stride=1)


def test_edge_sharpness_ranks_renders_above_softened_ones_and_ignores_noise():
    scene = shapes.sample_scenes(16, torch.Generator().manual_seed(0), held_out=True)
    images = shapes.render(scene)
    noise = 0.05 * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    sharp, soft, softer = (judge.edge_sharpness(x) for x in (images, _blur(images, 3), _blur(images, 7)))
    assert 0.4 < sharp.mean() < 0.5  # one pixel of anti-aliasing: about half the contrast per pixel
    assert (sharp > soft + 0.1).all() and (soft > softer + 0.05).all()
    assert (judge.edge_sharpness(soft_render(scene, torch.full((16,), 3.0), 128)) < sharp - 0.15).all()
    assert (judge.edge_sharpness((images + noise).clamp(0, 1)) - sharp).abs().max() < 0.05
    assert (judge.edge_sharpness((_blur(images, 3) + noise).clamp(0, 1)) < sharp - 0.1).all()


def test_soft_renders_keep_the_outline():
    """Soft edges without moving the outline: the pixels at least half way to the shape's colour
    are the silhouette's, the ramp reaches past it, and every shape still reads as itself."""
    scene = shapes.sample_scenes(16, torch.Generator().manual_seed(2))
    soft = soft_render(scene, torch.full((16,), 5.0), 128)
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
