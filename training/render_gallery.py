"""Render the README's gallery of the shipped tiny model family: one PNG grid.

    python -m training.render_gallery --out docs/gallery.png

Rows: text-to-image on held-out captions; the same captions with the pastel LoRA; canny control
maps and what the ControlNet draws from them (prompts without position words); inpainting (the
original, the mask, the result). Every tile is labelled with its prompt. CPU, about a minute.
"""

import argparse
import textwrap
from pathlib import Path

import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image, ImageDraw

from configs.model_spec import TINY_CONTROLNET_CANNY_DIR, TINY_LORA_DIR, TINY_MODEL_DIR
from deployments.canny import canny
from training import shapes
from training.evaluate import generate

TILE = 128
LABEL = 40
COLUMNS = 6


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/gallery.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    base = StableDiffusionXLPipeline.from_pretrained(TINY_MODEL_DIR)
    base.set_progress_bar_config(disable=True)
    scene = shapes.sample_scenes(COLUMNS, torch.Generator().manual_seed(args.seed + 1), held_out=True)
    prompts = [shapes.caption(scene, i) for i in range(COLUMNS)]
    rows = [[(image, text) for image, text in zip(generate(base, prompts, args.seed), prompts)]]

    controlnet = ControlNetModel.from_pretrained(TINY_CONTROLNET_CANNY_DIR)
    control_pipe = StableDiffusionXLControlNetPipeline.from_pipe(base, controlnet=controlnet)
    control_pipe.set_progress_bar_config(disable=True)
    control_scene = shapes.sample_scenes(COLUMNS, torch.Generator().manual_seed(args.seed + 2), held_out=True)
    controls = canny(shapes.render(control_scene)).expand(-1, 3, -1, -1)
    control_prompts = [shapes.caption(control_scene, i, with_position=False) for i in range(COLUMNS)]
    drawn = generate(control_pipe, control_prompts, args.seed, image=controls)
    rows.append([(control, "canny control map") for control in controls])
    rows.append([(image, f"+ControlNet: {text}") for image, text in zip(drawn, control_prompts)])

    inpaint = StableDiffusionXLInpaintPipeline.from_pipe(base)
    inpaint.set_progress_bar_config(disable=True)
    # shape, colour, background, position, size: a red circle top left on blue, a green star
    # bottom right on white; the quadrant holding each shape is repainted with another.
    init_scene = shapes.Scene(*(torch.tensor(v) for v in ((0, 3), (0, 3), (5, 8), (0, 8), (1, 1))), torch.zeros(2, 3))
    init = shapes.render(init_scene)
    mask = torch.zeros(2, 1, TILE, TILE)
    mask[0, :, : TILE // 2, : TILE // 2] = 1
    mask[1, :, TILE // 2 :, TILE // 2 :] = 1
    inpaint_prompts = [
        "a large yellow square on a blue background, top left",
        "a large red circle on a white background, bottom right",
    ]
    repainted = generate(inpaint, inpaint_prompts, args.seed, image=init, mask_image=mask, strength=1.0)
    inpaint_row = []
    for i in range(2):
        inpaint_row += [
            (init[i], shapes.caption(init_scene, i)),
            (init[i] * (1 - 0.6 * mask[i]) + 0.6 * mask[i], "mask (white: repaint)"),
            (repainted[i], f"inpainted: {inpaint_prompts[i]}"),
        ]
    rows.append(inpaint_row)

    base.load_lora_weights(TINY_LORA_DIR, weight_name="pastel.safetensors")
    rows.insert(1, [(image, f"+pastel LoRA: {text}") for image, text in zip(generate(base, prompts, args.seed), prompts)])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _grid(rows).save(out, optimize=True)
    print(f"wrote {out}")
    return out


def _grid(rows: list[list[tuple[torch.Tensor, str]]]) -> Image.Image:
    sheet = Image.new("RGB", (COLUMNS * TILE, len(rows) * (TILE + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        for c, (image, text) in enumerate(row):
            pixels = (image.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()
            x, y = c * TILE, r * (TILE + LABEL)
            sheet.paste(Image.fromarray(pixels), (x, y))
            draw.multiline_text((x + 2, y + TILE + 1), "\n".join(textwrap.wrap(text, 24)[:3]), fill="black", spacing=1)
    return sheet


if __name__ == "__main__":
    main()
