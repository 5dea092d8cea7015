"""Canny edge maps in batched torch: the control images of the canny ControlNet.

The classic steps (Gaussian blur, Sobel gradients, non-maximum suppression along the gradient,
double threshold with hysteresis), run on every colour channel with the strongest channel kept per
pixel, so edges between colours of equal brightness (red on green) are found too. Thresholds are
in units of colour contrast (0..1), independent of the image size.
"""

import torch
import torch.nn.functional as F

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4


def canny(images: torch.Tensor, low: float = 0.08, high: float = 0.2, sigma: float = 1.0) -> torch.Tensor:
    """Edges (B, 1, H, W) as 0.0 / 1.0 of images (B, C, H, W) in [0, 1]."""
    if not 0 < low <= high:
        raise ValueError(f"canny thresholds must satisfy 0 < low <= high, got low={low!r} high={high!r}")
    batch, channels, height, width = images.shape
    flat = _gaussian_blur(images.reshape(batch * channels, 1, height, width).float(), sigma)
    kernel_x = _SOBEL_X.to(flat.device)[None, None]
    gx = F.conv2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), kernel_x)
    gy = F.conv2d(F.pad(flat, (1, 1, 1, 1), mode="replicate"), kernel_x.transpose(2, 3))
    magnitude = torch.sqrt(gx * gx + gy * gy).reshape(batch, channels, height, width)
    strongest = magnitude.argmax(dim=1, keepdim=True)
    magnitude = magnitude.gather(1, strongest)
    gx = gx.reshape(batch, channels, height, width).gather(1, strongest)
    gy = gy.reshape(batch, channels, height, width).gather(1, strongest)
    thin = magnitude * _is_local_maximum(magnitude, gx, gy)
    return _hysteresis(thin >= high, thin >= low).float()


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, round(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    blurred = F.conv2d(padded, weights.view(1, 1, 1, -1))
    return F.conv2d(blurred, weights.view(1, 1, -1, 1))


def _is_local_maximum(magnitude: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Keep a pixel only where it beats both neighbours along its gradient (4 directions)."""
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    sector = ((angle + 22.5) // 45).long() % 4  # 0: horizontal, 1: 45°, 2: vertical, 3: 135°
    padded = F.pad(magnitude, (1, 1, 1, 1))
    height, width = magnitude.shape[-2:]

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return padded[..., 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]

    # (dy, dx) of the neighbour along the gradient; image rows grow downward.
    steps = ((0, 1), (1, 1), (1, 0), (1, -1))
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for index, (dy, dx) in enumerate(steps):
        ahead, behind = shifted(dy, dx), shifted(-dy, -dx)
        keep |= (sector == index) & (magnitude >= ahead) & (magnitude > behind)
    return keep


def _hysteresis(strong: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
    """Weak edge pixels survive when connected (8-neighbourhood) to a strong one."""
    edges = strong & weak
    while True:
        grown = weak & (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, edges):
            return edges
        edges = grown
