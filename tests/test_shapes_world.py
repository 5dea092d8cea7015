"""The synthetic training world, the rulers the semantic tests measure with, and the training
script's whole path (a smoke run whose output loads through the same calls as real weights)."""

import json

import pytest
import torch
from diffusers import ControlNetModel, StableDiffusionXLPipeline

from deployments.canny import canny
from training import judge, shapes
from training.train_tiny import main as train_main


def _scenes(n: int, seed: int = 0, held_out: bool = False) -> shapes.Scene:
    return shapes.sample_scenes(n, torch.Generator().manual_seed(seed), held_out=held_out)


def test_scenes_and_renders_are_deterministic_from_the_seed():
    a, b, c = _scenes(8, seed=1), _scenes(8, seed=1), _scenes(8, seed=2)
    assert torch.equal(shapes.render(a), shapes.render(b))
    assert not torch.equal(shapes.render(a), shapes.render(c))
    assert [shapes.caption(a, i) for i in range(8)] == [shapes.caption(b, i) for i in range(8)]


def test_held_out_triples_never_appear_in_training_scenes():
    train = _scenes(2000)
    held = _scenes(200, held_out=True)
    triples = lambda s: {(int(s.shape[i]), int(s.colour[i]), int(s.background[i])) for i in range(len(s))}  # noqa: E731
    assert not triples(train) & triples(held)
    assert all(shapes.is_held_out(*t) for t in triples(held))
    assert all(int(s) != int(b) for s, b in zip(train.colour, train.background))


def test_captions_name_what_is_drawn():
    scene = _scenes(1)
    text = shapes.caption(scene, 0)
    assert shapes.SHAPES[int(scene.shape[0])] in text
    assert f"{shapes.COLOUR_NAMES[int(scene.background[0])]} background" in text
    assert text.endswith(shapes.POSITION_NAMES[int(scene.position[0])])
    short = shapes.caption(scene, 0, with_size=False, with_position=False)
    assert not any(word in short for word in shapes.SIZE_NAMES) and "," not in short
    assert shapes.caption(shapes.Scene(*(torch.tensor([v]) for v in (0, 1, 0)), torch.tensor([4]), torch.tensor([0]), torch.zeros(1, 3)), 0) == (
        "a small orange circle on a red background, center"
    )


def test_the_judge_reads_ground_truth_renders_correctly():
    """The rulers of the semantic tests: exact on the training renders, normal and pastel."""
    scene = _scenes(64, seed=3, held_out=True)
    for pastel in (False, True):
        images = shapes.render(scene, pastel=pastel)
        foreground, background = judge.dominant_colours(images, pastel=pastel)
        assert torch.equal(foreground, scene.colour) and torch.equal(background, scene.background)
        assert (judge.classify_shapes(images, pastel=pastel) == scene.shape).float().mean() >= 0.95
        assert torch.equal(judge.positions(images, pastel=pastel), scene.position)
    assert judge.saturation(shapes.render(scene, pastel=True)).mean() < judge.saturation(shapes.render(scene)).mean() - 0.2


def test_the_judge_finds_nothing_in_noise():
    noise = torch.rand(16, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    foreground, background = judge.dominant_colours(noise)
    # Uniform noise spreads over the palette: a "background" covering most pixels is never found.
    counts = (judge.nearest_colours(noise) == background[:, None, None]).flatten(1).float().mean(1)
    assert counts.max() < 0.5


def test_canny_outlines_shapes_and_nothing_else():
    scene = _scenes(16, seed=4)
    edges = canny(shapes.render(scene))
    assert edges.shape == (16, 1, 128, 128)
    # Outline pixels hug the shape boundary; flat areas have none.
    coverage = shapes.shape_coverage(scene.shape, *shapes.geometry(scene), 128)
    boundary = torch.nn.functional.max_pool2d((coverage > 0.5).float()[:, None], 5, 1, 2) - (
        -torch.nn.functional.max_pool2d(-(coverage > 0.5).float()[:, None], 5, 1, 2)
    )
    assert (edges * (1 - boundary)).sum() == 0
    assert judge.edge_recall(boundary, edges).min() == 1.0
    assert judge.edge_recall(edges, boundary, tolerance=2).mean() > 0.9
    with pytest.raises(ValueError, match="low"):
        canny(shapes.render(scene), low=0.3, high=0.1)


def test_a_silhouette_is_the_shapes_area_without_colour():
    scene = shapes.sample_scenes(8, torch.Generator().manual_seed(3))
    maps = shapes.silhouette(scene)
    images = shapes.render(scene)
    assert maps.shape == (8, 1, 128, 128) and set(maps.unique().tolist()) == {0.0, 1.0}
    background = shapes.palette()[scene.background][:, :, None, None]
    differs = (images - background).abs().amax(dim=1) > 0.5 * (shapes.palette()[scene.colour] - shapes.palette()[scene.background]).abs().amax(dim=1)[:, None, None]
    assert torch.equal(differs, maps[:, 0] > 0)  # exactly where the render leaves the background (by half its contrast)


def test_training_smoke_run_writes_a_family_that_loads_like_real_weights(tmp_path):
    """Two steps of each stage at 64²: the output loads with from_pretrained / load_lora_weights
    and generates; the report records the command and each stage."""
    report = train_main(["--out", str(tmp_path), "--smoke", "--resolution", "64", "--device", "cpu"])
    assert set(report["stages"]) == {"vae", "base", "controlnet", "silhouette", "lora"}
    saved = json.loads((tmp_path / "models" / "tiny-training.json").read_text())
    assert saved["command"].endswith("--device cpu") and saved["stages"]["base"]["steps_run"] == 2

    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "models" / "tiny")
    assert pipe.vae.config.scaling_factor == pytest.approx(report["stages"]["vae"]["scaling_factor"])
    for folder in ("tiny-controlnet-canny", "tiny-controlnet-silhouette"):
        controlnet = ControlNetModel.from_pretrained(tmp_path / "models" / folder)
        assert controlnet.config.cross_attention_dim == pipe.unet.config.cross_attention_dim
    args = dict(prompt="a red circle", width=64, height=64, num_inference_steps=2, output_type="pt")
    before = pipe(generator=torch.Generator().manual_seed(0), **args).images
    pipe.load_lora_weights(tmp_path / "loras", weight_name="pastel.safetensors")
    after = pipe(generator=torch.Generator().manual_seed(0), **args).images
    assert before.shape == (1, 3, 64, 64) and not torch.equal(before, after)

    # A stage run alone continues from what --out holds.
    again = train_main(["--out", str(tmp_path), "--smoke", "--resolution", "64", "--device", "cpu", "--stages", "lora"])
    assert set(again["stages"]) == {"lora"}
    assert set(json.loads((tmp_path / "models" / "tiny-training.json").read_text())["stages"]) == set(report["stages"])
