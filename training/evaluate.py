"""Score the tiny model family on what it was trained to do, with `training.judge`.

    python -m training.evaluate                  # the shipped weights; prints a table, writes JSON
    python -m training.evaluate --out bench-out/eval.json
    python -m training.evaluate --vae /tmp/tiny/models/tiny/vae   # one VAE: does it record soft edges?

The semantic tests (`tests/test_semantics.py`) assert thresholds on these same measures; the README
records the numbers. Prompts come from held-out (shape, colour, background) triples.
"""

import argparse
import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from configs.model_spec import TINY_CONTROLNET_CANNY_DIR, TINY_CONTROLNET_DIRS, TINY_LORA_DIR, TINY_MODEL_DIR, TinyRefinerSpec, TinySpec
from deployments.canny import canny
from deployments.pipelines import load_refiner
from training import judge, shapes

STEPS = 20
#: The refiner comparison: steps of the whole schedule, and where the base hands over to the refiner.
REFINER_STEPS = 30
HANDOVER = 0.8


def held_out_scenes(n: int, seed: int) -> shapes.Scene:
    return shapes.sample_scenes(n, torch.Generator().manual_seed(seed), held_out=True)


def generate(pipe, prompts: list[str], seed: int = 0, *, steps: int = STEPS, output_type: str = "pt", **kwargs) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] (or latents); request i is seeded `seed + i`, as the service does."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompt=prompts, generator=generators, num_inference_steps=steps, output_type=output_type, **kwargs).images


def text_to_image(pipe, scene: shapes.Scene, images: torch.Tensor | None = None) -> dict:
    """Share of images with the caption's foreground colour, background colour, shape and position."""
    images = generate(pipe, [shapes.caption(scene, i) for i in range(len(scene))]) if images is None else images
    foreground, background = judge.dominant_colours(images)
    return {
        "foreground": (foreground == scene.colour).float().mean().item(),
        "background": (background == scene.background).float().mean().item(),
        "shape": (judge.classify_shapes(images) == scene.shape).float().mean().item(),
        "position": (judge.positions(images) == scene.position).float().mean().item(),
    }


def controlnet_edges(pipe, controlnet: ControlNetModel, scene: shapes.Scene) -> dict:
    """Edge recall of the control map in the output, with and without the ControlNet."""
    controls = canny(shapes.render(scene))
    with_control, without = _with_and_without(pipe, controlnet, scene, controls)
    return {
        "recall_with": judge.edge_recall(canny(with_control), controls).mean().item(),
        "recall_without": judge.edge_recall(canny(without), controls).mean().item(),
    }


def controlnet_silhouettes(pipe, controlnet: ControlNetModel, scene: shapes.Scene) -> dict:
    """Intersection over union of the silhouette map and the output's foreground (the pixels not
    of the background colour), with and without the ControlNet."""
    maps = shapes.silhouette(scene)
    with_control, without = _with_and_without(pipe, controlnet, scene, maps)
    return {
        "iou_with": judge.mask_iou(judge.foreground_mask(with_control), maps[:, 0] > 0).mean().item(),
        "iou_without": judge.mask_iou(judge.foreground_mask(without), maps[:, 0] > 0).mean().item(),
    }


def _with_and_without(pipe, controlnet: ControlNetModel, scene: shapes.Scene, maps: torch.Tensor):
    """The scene's images drawn with the ControlNet on `maps` (B, 1, H, W) and without it; prompts
    leave out position and size, so only the map says where the shape goes and how large it is."""
    prompts = [shapes.caption(scene, i, with_size=False, with_position=False) for i in range(len(scene))]
    control_pipe = StableDiffusionXLControlNetPipeline.from_pipe(pipe, controlnet=controlnet)
    control_pipe.set_progress_bar_config(disable=True)
    return generate(control_pipe, prompts, image=maps.expand(-1, 3, -1, -1)), generate(pipe, prompts)


def inpainting(pipe, n: int = 8) -> dict:
    """A large red circle top left on blue; the top-left quadrant is masked and repainted as "a
    large yellow square". Reports the quadrant's yellow and red shares before and after, how many
    outputs read as a square, and the change outside the mask (kept 8 px clear of its edge)."""
    scene = shapes.Scene(*(torch.tensor([v] * n) for v in (0, 0, 5, 0, 1)), torch.zeros(n, 3))
    init = shapes.render(scene)
    half = init.shape[-1] // 2
    mask = torch.zeros(n, 1, 2 * half, 2 * half)
    mask[:, :, :half, :half] = 1
    inpaint = StableDiffusionXLInpaintPipeline.from_pipe(pipe)
    inpaint.set_progress_bar_config(disable=True)
    prompts = ["a large yellow square on a blue background, top left"] * n
    out = generate(inpaint, prompts, image=init, mask_image=mask, strength=1.0)

    def share(images: torch.Tensor, colour: str) -> float:
        labels = judge.nearest_colours(images)[:, :half, :half]
        return (labels == shapes.COLOUR_NAMES.index(colour)).float().mean().item()

    keep = torch.ones(2 * half, 2 * half, dtype=torch.bool)
    keep[: half + 8, : half + 8] = False
    return {
        "yellow_in_mask_before": share(init, "yellow"),
        "yellow_in_mask": share(out, "yellow"),
        "red_in_mask_before": share(init, "red"),
        "red_in_mask": share(out, "red"),
        "square": (judge.classify_shapes(out) == shapes.SHAPES.index("square")).float().mean().item(),
        "outside_mean_abs_diff": (out - init).abs()[:, :, keep].mean().item(),
    }


def img2img(pipe, scene: shapes.Scene, strengths=(0.2, 0.6, 0.95)) -> dict:
    """Mean absolute distance from the init image per strength; the prompt names the init's
    colours and shape and leaves layout open."""
    init = shapes.render(scene)
    img2img_pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe)
    img2img_pipe.set_progress_bar_config(disable=True)
    prompts = [shapes.caption(scene, i, with_size=False, with_position=False) for i in range(len(scene))]
    return {
        str(strength): (generate(img2img_pipe, prompts, image=init, strength=strength) - init).abs().mean().item()
        for strength in strengths
    }


def refiner_sharpness(pipe, refiner: StableDiffusionXLImg2ImgPipeline, scene: shapes.Scene) -> dict:
    """The base alone (REFINER_STEPS steps) against the base to `denoising_end=HANDOVER` and the
    refiner from there, on the same prompts and seeds: mean `judge.edge_sharpness`, the share of
    images the refiner made sharper, and the prompt's colours, shape and position. The refiner
    runs at the pipeline's defaults (guidance 5, aesthetic scores 6.0 and 2.5) twice: `refined`
    as diffusers calls it (empty negative prompt), and `score_only` with the prompt as negative
    prompt too, so guidance pushes along the aesthetic score alone. The score's guidance is what
    sharpens (`train_tiny.Trainer.refiner_batch`): with both scores 6.0 the refiner's images
    measure as the base's (0.234 against 0.235 on 32 held-out scenes; refined 0.256)."""
    prompts = [shapes.caption(scene, i) for i in range(len(scene))]
    alone = generate(pipe, prompts, steps=REFINER_STEPS)
    latents = generate(pipe, prompts, steps=REFINER_STEPS, denoising_end=HANDOVER, output_type="latent")

    def refine(**kwargs) -> torch.Tensor:
        return generate(refiner, prompts, steps=REFINER_STEPS, image=latents, denoising_start=HANDOVER, **kwargs)

    sharpness = judge.edge_sharpness(alone)
    scores = {"sharpness_base": sharpness.nanmean().item()}
    scores |= {f"{key}_base": value for key, value in text_to_image(pipe, scene, alone).items()}
    for name, images in (("refined", refine()), ("score_only", refine(negative_prompt=prompts))):
        refined = judge.edge_sharpness(images)
        scores[f"sharpness_{name}"] = refined.nanmean().item()
        scores[f"sharper_share_{name}"] = (refined > sharpness).float().mean().item()  # NaN (no shape) is not sharper
        scores |= {f"{key}_{name}": value for key, value in text_to_image(pipe, scene, images).items()}
    return scores


@torch.no_grad()
def vae_softness(vae, scene: shapes.Scene, half_widths=(0.0, 1.0, 2.0, 3.5, 5.0)) -> dict:
    """Whether the VAE's latents record how soft an edge is: `judge.edge_sharpness` of renders
    whose edges ramp over ±w pixels (`shapes.soft_render`; 0 is the crisp render) and of their round trips
    through the VAE (latent means), and the crisp round trip's mean squared error. A refiner can
    only sharpen what the round trip of a soft render shows as softer than a crisp one's."""
    device = next(vae.parameters()).device
    scene = scene.to(device)
    scores = {}
    for width in half_widths:
        images = shapes.render(scene) if width == 0 else shapes.soft_render(scene, torch.full((len(scene),), width, device=device), 128)
        decoded = (vae.decode(vae.encode(images * 2 - 1).latent_dist.mean).sample / 2 + 0.5).clamp(0, 1)
        scores[f"render_{width:g}px"] = judge.edge_sharpness(images.cpu()).nanmean().item()
        scores[f"round_trip_{width:g}px"] = judge.edge_sharpness(decoded.cpu()).nanmean().item()
        if width == 0:
            scores["round_trip_mse"] = torch.nn.functional.mse_loss(decoded, images).item()
    return scores


def lora_palette(scene: shapes.Scene, plain: torch.Tensor) -> dict:
    """The pastel LoRA on the same prompts and seeds as `plain`: saturation with and without, and
    whether the backgrounds keep their (pastel) colour."""
    pipe = StableDiffusionXLPipeline.from_pretrained(TINY_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(TINY_LORA_DIR, weight_name="pastel.safetensors")
    pastel = generate(pipe, [shapes.caption(scene, i) for i in range(len(scene))])
    _, background = judge.dominant_colours(pastel, pastel=True)
    return {
        "saturation_plain": judge.saturation(plain).mean().item(),
        "saturation_lora": judge.saturation(pastel).mean().item(),
        "pastel_background": (background == scene.background).float().mean().item(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write the scores here as JSON")
    parser.add_argument("-n", type=int, default=48, help="held-out prompts for text-to-image and the LoRA")
    parser.add_argument("--vae", type=Path, default=None, help="score only this VAE folder's `vae_softness` (#16's experiments)")
    args = parser.parse_args(argv)
    if args.vae:
        return _report({"vae": vae_softness(AutoencoderKL.from_pretrained(args.vae), held_out_scenes(64, seed=5))}, args.out)
    pipe = StableDiffusionXLPipeline.from_pretrained(TINY_MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    scene = held_out_scenes(args.n, seed=1234)
    plain = generate(pipe, [shapes.caption(scene, i) for i in range(len(scene))])
    scores = {
        "text_to_image": text_to_image(pipe, scene, plain),
        "controlnet": controlnet_edges(pipe, ControlNetModel.from_pretrained(TINY_CONTROLNET_CANNY_DIR), held_out_scenes(16, seed=99)),
        "silhouette": controlnet_silhouettes(
            pipe, ControlNetModel.from_pretrained(TINY_CONTROLNET_DIRS["silhouette"]), held_out_scenes(16, seed=99)
        ),
        "inpainting": inpainting(pipe),
        "img2img_distance": img2img(pipe, held_out_scenes(8, seed=7)),
        "lora": lora_palette(scene, plain),
        "vae": vae_softness(pipe.vae, held_out_scenes(64, seed=5)),
        "refiner": refiner_sharpness(pipe, load_refiner(TinyRefinerSpec(), TinySpec(device="cpu")), scene),
    }
    return _report(scores, args.out)


def _report(scores: dict, out: Path | None) -> dict:
    for group, values in scores.items():
        print(f"{group:<18}" + "  ".join(f"{k} {v:.3f}" for k, v in values.items()))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(scores, indent=2) + "\n")
    return scores


if __name__ == "__main__":
    main()
