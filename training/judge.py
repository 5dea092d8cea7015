"""Reading generated images back into words: which colours, which shape, how close to an edge map,
how sharp the outline.

The semantic tests and the training report use these to score the model. Each measure is checked
against ground-truth renders in `tests/test_shapes_world.py`, so a failing semantic test means the
model is wrong, not the ruler.
"""

import torch
import torch.nn.functional as F

from training.shapes import POSITION_NAMES, POSITIONS, SHAPES, palette, shape_coverage

#: Radii tried when fitting a shape template to a foreground mask (fractions of the side).
_FIT_RADII = torch.linspace(0.04, 0.32, 29)
#: Masks are compared at this resolution at most (fitting cost grows with the pixel count).
_FIT_RESOLUTION = 64
#: Sobel kernels (d/dx, d/dy), scaled to give the slope per pixel of a linear ramp.
_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8


def nearest_colours(images: torch.Tensor, pastel: bool = False) -> torch.Tensor:
    """(B, H, W) index of the nearest palette colour of each pixel of images (B, 3, H, W) in [0, 1]."""
    colours = palette(pastel).to(images.device)
    distances = ((images[:, None] - colours[None, :, :, None, None]) ** 2).sum(dim=2)
    return distances.argmin(dim=1)


def dominant_colours(images: torch.Tensor, pastel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground, background) palette indices per image.

    The background is the most common colour (shapes cover under a quarter of the image); the
    foreground the most common of the rest, or -1 when nothing else is there.
    """
    counts = _colour_counts(nearest_colours(images, pastel))
    background = counts.argmax(dim=1)
    counts[torch.arange(len(counts)), background] = 0
    foreground = torch.where(counts.max(dim=1).values > 0, counts.argmax(dim=1), -1)
    return foreground, background


def foreground_mask(images: torch.Tensor, pastel: bool = False) -> torch.Tensor:
    """(B, H, W) bool: pixels not named the background colour."""
    labels = nearest_colours(images, pastel)
    background = _colour_counts(labels).argmax(dim=1)
    return labels != background[:, None, None]


def _colour_counts(labels: torch.Tensor) -> torch.Tensor:
    """(B, colours) pixel count of each palette colour in labels (B, H, W)."""
    return F.one_hot(labels.flatten(1), len(palette())).sum(dim=1)


def _centroids(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids (B, 2) as (x, y) fractions of the side, and areas (B,) in pixels, of masks (B, H, W)."""
    resolution = masks.shape[-1]
    axis = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution
    area = masks.flatten(1).sum(1)
    weighted = torch.stack([(masks.sum(1) * axis).sum(1), (masks.sum(2) * axis).sum(1)], dim=1)
    return weighted / area.clamp(min=1)[:, None], area


def classify_shapes(images: torch.Tensor, pastel: bool = False) -> torch.Tensor:
    """(B,) index into SHAPES of the best-fitting template, -1 where no foreground is found.

    Each shape's template is rendered at the foreground's centroid over a range of radii; the shape
    whose best template overlaps the mask most (intersection over union) wins.
    """
    masks = foreground_mask(images, pastel).float()
    if masks.shape[-1] > _FIT_RESOLUTION:
        masks = F.adaptive_avg_pool2d(masks[:, None], _FIT_RESOLUTION)[:, 0]
    masks = masks >= 0.5
    centres, areas = _centroids(masks.float())
    candidates = len(SHAPES) * len(_FIT_RADII)
    shapes = torch.arange(len(SHAPES)).repeat_interleave(len(_FIT_RADII))
    radii = _FIT_RADII.repeat(len(SHAPES))
    result = torch.full((len(masks),), -1, dtype=torch.long)
    for i, (mask, centre, area) in enumerate(zip(masks, centres, areas)):
        if area < 4:
            continue
        templates = shape_coverage(shapes, centre.expand(candidates, 2), radii, masks.shape[-1]) > 0.5
        inter = (templates & mask).flatten(1).sum(1)
        union = (templates | mask).flatten(1).sum(1)
        iou = (inter / union).view(len(SHAPES), len(_FIT_RADII)).max(dim=1).values
        result[i] = int(iou.argmax())
    return result


def positions(images: torch.Tensor, pastel: bool = False) -> torch.Tensor:
    """(B,) index into POSITION_NAMES nearest the foreground's centroid, -1 without foreground."""
    centroids, areas = _centroids(foreground_mask(images, pastel).float())
    centres = torch.tensor([POSITIONS[name] for name in POSITION_NAMES])
    return torch.where(areas >= 4, torch.cdist(centroids, centres).argmin(dim=1), -1)


def edge_recall(edges: torch.Tensor, reference: torch.Tensor, tolerance: int = 2) -> torch.Tensor:
    """(B,) share of the reference's edge pixels with an edge of `edges` within `tolerance` pixels."""
    near = F.max_pool2d(edges.float(), 2 * tolerance + 1, stride=1, padding=tolerance) > 0
    ref = reference.bool()
    hits = (near & ref).flatten(1).sum(1).float()
    return hits / ref.flatten(1).sum(1).clamp(min=1)


def mask_iou(masks: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,) intersection over union of bool masks (B, H, W) with the reference's."""
    intersection = (masks & reference).flatten(1).sum(1).float()
    union = (masks | reference).flatten(1).sum(1).float()
    return intersection / union.clamp(min=1)


def saturation(images: torch.Tensor) -> torch.Tensor:
    """(B,) mean HSV saturation of images (B, 3, H, W) in [0, 1]."""
    high = images.max(dim=1).values
    low = images.min(dim=1).values
    return ((high - low) / high.clamp(min=1e-3)).flatten(1).mean(1)


def edge_sharpness(images: torch.Tensor, pastel: bool = False) -> torch.Tensor:
    """(B,) steepness of the shape's outline in images (B, 3, H, W) in [0, 1]: the mean gradient
    magnitude, in foreground/background contrasts per pixel, over the pixels either side of it.

    Each image is projected on its own colour axis, t = <x - bg, fg - bg> / |fg - bg|², with bg
    and fg the median colours of the pixels named the dominant background and foreground colour
    (`dominant_colours`): t is 0 on the background and 1 on the shape, whatever the colour pair.
    The outline is the pixels where t > 1/2 differs from a 4-neighbour; the slope there is the
    Sobel gradient of t. A render (edges anti-aliased over one pixel) scores 0.44, a Gaussian blur
    of it by 1, 1.5 and 2 px 0.30, 0.23 and 0.18. Noise is not rewarded: pixels off the outline
    are not read, and on it the 3x3 Sobel averages noise out (renders plus noise of std 0.05:
    0.44). NaN where no foreground is found.
    """
    foreground, background = dominant_colours(images, pastel)
    labels = nearest_colours(images, pastel).flatten(1)
    pixels = images.flatten(2)
    result = torch.full((len(images),), float("nan"))
    for i in torch.nonzero(foreground >= 0).flatten().tolist():
        bg = pixels[i][:, labels[i] == background[i]].median(dim=1).values
        axis = pixels[i][:, labels[i] == foreground[i]].median(dim=1).values - bg
        t = ((images[i] - bg[:, None, None]) * axis[:, None, None]).sum(0) / axis.pow(2).sum().clamp(min=1e-6)
        slope = sobel(t[None, None])[0].norm(dim=0)
        outline = _outline(t > 0.5)
        if outline.any():
            result[i] = slope[outline].mean().item()
    return result


def sobel(images: torch.Tensor) -> torch.Tensor:
    """(B, 2C, H, W): horizontal and vertical Sobel gradients of each channel of images (B, C, H, W),
    borders replicated."""
    kernels = torch.stack([_SOBEL, _SOBEL.T])[:, None].to(images)
    channels = images.shape[1]
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernels.repeat(channels, 1, 1, 1), groups=channels)


def _outline(mask: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: pixels of mask (H, W) that differ from one of their four neighbours."""
    height, width = mask.shape
    padded = F.pad(mask[None, None].float(), (1, 1, 1, 1), mode="replicate")[0, 0].bool()
    shifted = [padded[dy : dy + height, dx : dx + width] for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2))]
    return torch.stack([neighbour != mask for neighbour in shifted]).any(dim=0)
