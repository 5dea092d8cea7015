"""The synthetic world the tiny model family is trained on: flat shapes on flat backgrounds.

Everything is procedural and deterministic from a seed: a `Scene` table is drawn with a seeded
`torch.Generator`, rendered with signed distance functions (one pixel of anti-aliasing) and
captioned as "a large red circle on a blue background, top left". Rendering is batched torch, so
it runs on the GPU during training and on the CPU in tests.

Some (shape, colour, background) triples are held out of training (`is_held_out`); the semantic
tests prompt with exactly those, so passing them means the model composes words it learned
separately rather than recalling pictures it saw.
"""

import math
from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle", "star")

#: name -> RGB (0..255). Chosen far apart in RGB so nearest-colour naming is unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 70, 210),
    "purple": (120, 50, 170),
    "magenta": (220, 50, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOUR_NAMES = tuple(COLOURS)

#: position word -> centre (x, y) as fractions of the image side (y grows downward).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "center": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}
POSITION_NAMES = tuple(POSITIONS)

#: size word -> radius as a fraction of the image side (before jitter).
SIZES: dict[str, float] = {"small": 0.12, "large": 0.2}
SIZE_NAMES = tuple(SIZES)

#: How far the pastel LoRA's world mixes every colour toward white.
PASTEL_MIX = 0.5

_CENTRE_JITTER = 0.04
_RADIUS_JITTER = 0.1
_STAR_INNER = 0.45


def is_held_out(shape: int, colour: int, background: int) -> bool:
    """About one (shape, colour, background) triple in ten never appears in training."""
    return (shape * 7 + colour * 3 + background) % 10 == 0


@dataclass(frozen=True)
class Scene:
    """A batch of scene descriptions: integer indices into the tables above, plus jitter."""

    shape: torch.Tensor  # (B,) index into SHAPES
    colour: torch.Tensor  # (B,) index into COLOUR_NAMES
    background: torch.Tensor  # (B,) index into COLOUR_NAMES, never equal to colour
    position: torch.Tensor  # (B,) index into POSITION_NAMES
    size: torch.Tensor  # (B,) index into SIZE_NAMES
    jitter: torch.Tensor  # (B, 3) uniform in [-1, 1]: centre x, centre y, radius

    def __len__(self) -> int:
        return int(self.shape.shape[0])

    def to(self, device: str | torch.device) -> "Scene":
        return Scene(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def rows(self, start: int, stop: int) -> "Scene":
        return Scene(*(getattr(self, f)[start:stop] for f in self.__dataclass_fields__))


def _triples(held_out: bool) -> torch.Tensor:
    """Every (shape, colour, background) with background != colour on one side of the split."""
    return torch.tensor(
        [
            (shape, colour, background)
            for shape in range(len(SHAPES))
            for colour in range(len(COLOURS))
            for background in range(len(COLOURS))
            if background != colour and is_held_out(shape, colour, background) == held_out
        ]
    )


def sample_scenes(n: int, generator: torch.Generator, *, held_out: bool = False) -> Scene:
    """`n` random scenes; `held_out=False` gives training triples only, `True` held-out ones only."""
    triples = _triples(held_out)
    picked = triples[torch.randint(len(triples), (n,), generator=generator)]
    position = torch.randint(len(POSITIONS), (n,), generator=generator)
    size = torch.randint(len(SIZES), (n,), generator=generator)
    jitter = torch.rand(n, 3, generator=generator) * 2 - 1
    return Scene(picked[:, 0], picked[:, 1], picked[:, 2], position, size, jitter)


def caption(scene: Scene, i: int, *, with_size: bool = True, with_position: bool = True) -> str:
    """The caption of scene `i`; size and position words can be left out (the model then picks)."""
    size = f"{SIZE_NAMES[int(scene.size[i])]} " if with_size else ""
    background = COLOUR_NAMES[int(scene.background[i])]
    text = f"{size}{COLOUR_NAMES[int(scene.colour[i])]} {SHAPES[int(scene.shape[i])]} on {_article(background)} {background} background"
    text = f"{_article(text)} {text}"
    if with_position:
        text += f", {POSITION_NAMES[int(scene.position[i])]}"
    return text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def palette(pastel: bool = False) -> torch.Tensor:
    """(len(COLOURS), 3) float colours in [0, 1]; `pastel` mixes each toward white."""
    colours = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255.0
    return colours * (1 - PASTEL_MIX) + PASTEL_MIX if pastel else colours


def geometry(scene: Scene) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres (B, 2) and radii (B,) as fractions of the image side, jitter applied."""
    device = scene.position.device
    centres = torch.tensor([POSITIONS[name] for name in POSITION_NAMES], device=device)[scene.position]
    centres = centres + scene.jitter[:, :2] * _CENTRE_JITTER
    radii = torch.tensor([SIZES[name] for name in SIZE_NAMES], device=device)[scene.size]
    radii = radii * (1 + scene.jitter[:, 2] * _RADIUS_JITTER)
    return centres, radii


def render(scene: Scene, resolution: int = 128, *, pastel: bool = False) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1], on the scene's device."""
    centres, radii = geometry(scene)
    coverage = shape_coverage(scene.shape, centres, radii, resolution)
    colours = palette(pastel).to(scene.colour.device)
    fg = colours[scene.colour][:, :, None, None]
    bg = colours[scene.background][:, :, None, None]
    return bg + (fg - bg) * coverage[:, None]


def silhouette(scene: Scene, resolution: int = 128) -> torch.Tensor:
    """(B, 1, H, W) the shape's area as 1.0 (pixels at least half inside), 0.0 elsewhere: the
    control map of the silhouette ControlNet, which carries layout and shape but no colour."""
    centres, radii = geometry(scene)
    return (shape_coverage(scene.shape, centres, radii, resolution) >= 0.5).float()[:, None]


def shape_coverage(shape: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, H, W) fraction of each pixel inside the shape, anti-aliased over one pixel."""
    device = centres.device
    axis = (torch.arange(resolution, device=device, dtype=torch.float32) + 0.5) / resolution
    # Coordinates relative to each centre, y pointing up so the triangle and star stand upright.
    x = axis[None, None, :] - centres[:, 0, None, None]
    y = centres[:, 1, None, None] - axis[None, :, None]
    x, y = torch.broadcast_tensors(x, y)
    r = radii[:, None, None]
    distances = torch.stack(
        [_circle(x, y, r), _square(x, y, r), _triangle(x, y, r), _star(x, y, r)], dim=1
    )  # (B, 4, H, W)
    d = distances.gather(1, shape.view(-1, 1, 1, 1).expand(-1, 1, resolution, resolution))[:, 0]
    return (0.5 - d * resolution).clamp(0, 1)


# Signed distances (negative inside), after Inigo Quilez's 2D distance functions. Each shape's
# size is set so its area is close to the circle's of the same radius.


def _circle(x, y, r):
    return torch.sqrt(x * x + y * y) - r


def _square(x, y, r):
    half = r * (math.sqrt(math.pi) / 2)
    dx, dy = x.abs() - half, y.abs() - half
    outside = torch.sqrt(dx.clamp(min=0) ** 2 + dy.clamp(min=0) ** 2)
    return outside + torch.maximum(dx, dy).clamp(max=0)


def _triangle(x, y, r):
    # Equilateral, centred on its centroid, half side `half`.
    half = r * 1.3
    k = math.sqrt(3.0)
    px = x.abs() - half
    py = y + half / k
    fold = px + k * py > 0
    px, py = torch.where(fold, (px - k * py) / 2, px), torch.where(fold, (-k * px - py) / 2, py)
    px = px - torch.maximum(px, -2 * half).clamp(max=0)
    return -torch.sqrt(px * px + py * py) * torch.sign(py)


def _star(x, y, r):
    # Five points, outer radius `outer`, inner radius `_STAR_INNER * outer`.
    outer = r * 1.4
    k1x, k1y = 0.809016994375, -0.587785252292
    k2x, k2y = -k1x, k1y
    px, py = x.abs(), y
    dot = (k1x * px + k1y * py).clamp(min=0)
    px, py = px - 2 * dot * k1x, py - 2 * dot * k1y
    dot = (k2x * px + k2y * py).clamp(min=0)
    px, py = px - 2 * dot * k2x, py - 2 * dot * k2y
    px = px.abs()
    py = py - outer
    bax, bay = -_STAR_INNER * k1y, _STAR_INNER * k1x - 1
    h = ((px * bax + py * bay) / (bax * bax + bay * bay)).clamp(min=0)
    h = torch.minimum(h, outer)
    dx, dy = px - bax * h, py - bay * h
    return torch.sqrt(dx * dx + dy * dy) * torch.sign(py * bax - px * bay)


def soft_render(scene: Scene, half_widths: torch.Tensor, resolution: int, samples: int = 8) -> torch.Tensor:
    """Images (B, 3, H, W) whose edges ramp over ±`half_widths` (B,) pixels while the outline stays
    where `render` draws it: the mean of `samples` renders scaled about the shape's centre,
    from -half_width to +half_width pixels at its radius. A Gaussian blur also rounds corners and
    erases a small star's points, which base samples keep (only their edges are soft): a refiner
    trained on blurred renders turned 4 of 48 held-out images, all small stars, into pentagons."""
    centres, radii = geometry(scene)
    spread = half_widths / (radii * resolution)
    offsets = torch.linspace(-1, 1, samples, device=radii.device)
    coverage = torch.stack([shape_coverage(scene.shape, centres, radii * (1 + o * spread), resolution) for o in offsets]).mean(0)
    colours = palette().to(radii.device)
    foreground, background = colours[scene.colour][:, :, None, None], colours[scene.background][:, :, None, None]
    return background + (foreground - background) * coverage[:, None]
