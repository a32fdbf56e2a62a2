"""Data augmentation of a whole batch on the GPU: photometric jitter, the 8 flips/transposes, zoom in/out.

Training decodes the dataset once into a uint8 tensor on the device; every step then augments a batch
with a handful of tensor ops and one `grid_sample`, so no CPU data loader limits the step rate.
The synthetic classes are shapes under random rotation, so every flip and transpose keeps the label.

Shapes: images uint8 [B, 3, S, S]; boxes float [B, G, 4] x1y1x2y2 in pixels; labels int64 [B, G], 0 = padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges; `zoom` is the factor objects are scaled by (<1 zoom out, >1 zoom in)."""

    photometric: float = 0.8  # probability of brightness/contrast/saturation jitter
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.3
    flip: float = 0.5  # probability of each of: horizontal flip, vertical flip, transpose
    zoom_probability: float = 0.5
    zoom_min: float = 0.7
    zoom_max: float = 1.5
    min_visible: float = 0.5  # a box cut by the crop keeps its label if this fraction of its area remains
    min_side_px: float = 2.0  # ... and both sides stay at least this long


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 (x / 255 - mean) / std; mean, std [3]."""
    return (images.float() / 255.0 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def _uniform(n: int, low: float, high: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (high - low) + low


def photometric_jitter(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """float [B, 3, H, W] in [0, 1] -> same, brightness x, contrast about the mean, saturation about grey."""
    batch, device = images.shape[0], images.device
    apply = (torch.rand(batch, generator=gen, device=device) < cfg.photometric).float().view(-1, 1, 1, 1)

    def factor(spread: float) -> torch.Tensor:
        return 1.0 + apply * _uniform(batch, -spread, spread, gen, device).view(-1, 1, 1, 1)

    out = images * factor(cfg.brightness)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * factor(cfg.contrast) + mean
    grey = 0.299 * out[:, 0:1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3]
    out = (out - grey) * factor(cfg.saturation) + grey
    return out.clamp(0.0, 1.0)


def random_geometry(
    batch: int, cfg: AugmentConfig, gen: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image forward maps p_out = M p_in + t in normalised coordinates [-1, 1]: M [B, 2, 2], t [B, 2].

    M = zoom x (a flip/transpose); t keeps the zoomed image covering the frame (zoom in) or inside it (out).
    """
    hflip = torch.rand(batch, generator=gen, device=device) < cfg.flip
    vflip = torch.rand(batch, generator=gen, device=device) < cfg.flip
    transpose = torch.rand(batch, generator=gen, device=device) < cfg.flip
    eye = torch.eye(2, device=device).expand(batch, 2, 2)
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], device=device).expand(batch, 2, 2)
    dihedral = torch.where(transpose.view(-1, 1, 1), swap, eye)
    signs = torch.stack([1.0 - 2.0 * hflip.float(), 1.0 - 2.0 * vflip.float()], dim=1)  # [B, 2]
    dihedral = dihedral * signs[:, :, None]  # flip the output axes
    zoomed = torch.rand(batch, generator=gen, device=device) < cfg.zoom_probability
    log_zoom = _uniform(batch, math.log(cfg.zoom_min), math.log(cfg.zoom_max), gen, device)
    zoom = torch.where(zoomed, log_zoom.exp(), torch.ones_like(log_zoom))
    slack = (zoom - 1.0).abs()[:, None]
    shift = (torch.rand(batch, 2, generator=gen, device=device) * 2.0 - 1.0) * slack
    return zoom[:, None, None] * dihedral, shift


def warp_images(images: torch.Tensor, matrix: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Resample float [B, C, S, S] so that input point p lands at M p + t; outside the image is 0.

    Normalise before warping so that 0 is the mean colour of the model's input normalisation.
    """
    inverse = torch.linalg.inv_ex(matrix).inverse  # inv_ex: no host sync for error checking
    theta = torch.cat([inverse, -(inverse @ shift[:, :, None])], dim=2)  # output -> input
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def warp_boxes(
    boxes: torch.Tensor,
    labels: torch.Tensor,
    matrix: torch.Tensor,
    shift: torch.Tensor,
    image_size: int,
    cfg: AugmentConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map boxes [B, G, 4] (pixels) through p -> M p + t, clip to the frame, drop what the crop cut away.

    Returns (boxes [B, G, 4], labels [B, G]); a dropped box gets label 0 and a zero box.
    """
    half = image_size / 2.0
    corners = boxes.reshape(boxes.shape[0], -1, 2) / half - 1.0  # [B, 2G, 2] normalised
    moved = corners @ matrix.transpose(1, 2) + shift[:, None, :]
    moved = (moved + 1.0) * half
    moved = moved.reshape(boxes.shape[0], -1, 2, 2)  # [B, G, corner, xy]
    lo, hi = moved.min(dim=2).values, moved.max(dim=2).values
    full_area = (hi - lo).prod(dim=-1)
    lo_c, hi_c = lo.clamp(0, image_size), hi.clamp(0, image_size)
    sides = hi_c - lo_c
    kept_area = sides.clamp(min=0).prod(dim=-1)
    keep = (
        (labels > 0)
        & (kept_area >= cfg.min_visible * full_area.clamp(min=1e-6))
        & (sides >= cfg.min_side_px).all(dim=-1)
    )
    out_boxes = torch.where(keep[:, :, None], torch.cat([lo_c, hi_c], dim=-1), torch.zeros_like(boxes))
    return out_boxes, torch.where(keep, labels, torch.zeros_like(labels))


def augment_batch(
    images: torch.Tensor,
    boxes: torch.Tensor,
    labels: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    cfg: AugmentConfig,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images [B, 3, S, S] + targets -> normalised float32 images [B, 3, S, S] + warped targets."""
    x = photometric_jitter(images.float() / 255.0, cfg, gen)
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    matrix, shift = random_geometry(x.shape[0], cfg, gen, x.device)
    x = warp_images(x, matrix, shift)
    boxes, labels = warp_boxes(boxes, labels, matrix, shift, x.shape[-1], cfg)
    return x, boxes, labels
