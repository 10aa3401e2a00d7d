"""Pictures a person looks at to judge a tokenizer or a prior: the recon grid and the sample grids.

Every sample becomes a thumbnail (uint8 (3, h, w)) by its modality (`THUMBNAILS`): an image is its own pixels, an
audio clip a drawn waveform. Thumbnails are tiled row-major with white borders; small ones are first upscaled by
an integer factor (nearest: no pixel is invented) until the grid is at least `MIN_WIDTH` pixels wide, since 16x16
digits tiled 8 across (136x34 px, issue 9) are too small to see.

    write_png(grid(thumbnails(x, "image"), cols=8), path)
    write_png(recon_grid(x, x_hat, "audio"), path)      # originals on odd rows, reconstructions under them
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from data.files import write_bytes_atomic
from data.image import image_to_png
from data.media import to_uint8

MIN_WIDTH = 512  # px: grids narrower than this are upscaled (nearest, integer factor)
PAD = 2  # px of white border around every thumbnail
WAVE_HEIGHT, WAVE_WIDTH = 48, 192  # px of one audio thumbnail
WAVE_COLOUR = (40, 70, 160)


def image_thumbnails(x: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> uint8 (N, 3, H, W): the pixels a PNG of them holds."""
    return to_uint8(x)


def waveform_thumbnails(x: torch.Tensor, height: int = WAVE_HEIGHT, width: int = WAVE_WIDTH) -> torch.Tensor:
    """Clips (N, 1, T) in [-1, 1] -> uint8 (N, 3, height, width): per pixel column the min..max of its samples,
    drawn on white around a grey zero line."""
    x = x.detach().float().clamp(-1, 1).cpu()
    top = F.adaptive_max_pool1d(x, width)[:, 0]  # (N, width): the largest sample of each column's share of T
    bottom = -F.adaptive_max_pool1d(-x, width)[:, 0]  # (N, width): the smallest
    to_row = lambda v: ((1 - v) / 2 * (height - 1)).round().long()  # +1 -> row 0 (top), -1 -> the last row
    rows = torch.arange(height)[None, :, None]  # (1, height, 1)
    ink = (rows >= to_row(top)[:, None]) & (rows <= to_row(bottom)[:, None])  # (N, height, width)
    out = torch.full((x.shape[0], 3, height, width), 255, dtype=torch.uint8)
    out[:, :, int(to_row(torch.tensor(0.0)))] = 200  # the zero line, where silence is drawn
    for c, value in enumerate(WAVE_COLOUR):
        out[:, c][ink] = value
    return out


THUMBNAILS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "image": image_thumbnails,
    "audio": waveform_thumbnails,
}


def thumbnails(x: torch.Tensor, modality: str) -> torch.Tensor:
    """Samples (N, C, *S) in [-1, 1] of `modality` -> uint8 (N, 3, h, w)."""
    if modality not in THUMBNAILS:
        raise KeyError(f"no thumbnail for modality {modality!r}; add one to THUMBNAILS ({sorted(THUMBNAILS)})")
    return THUMBNAILS[modality](x)


def upscale_factor(width: int, cols: int, min_width: int = MIN_WIDTH) -> int:
    """The integer factor that makes `cols` thumbnails of `width` px at least `min_width` px wide (>= 1)."""
    return max(1, math.ceil(min_width / (cols * width)))


def grid(thumbs: torch.Tensor, cols: int, min_width: int = MIN_WIDTH, pad: int = PAD) -> torch.Tensor:
    """uint8 (N, 3, h, w) -> one uint8 (3, rows*(s*h+pad)+pad, cols*(s*w+pad)+pad) image, row-major, white
    borders, every thumbnail upscaled s = upscale_factor(w, cols, min_width) times (nearest)."""
    s = upscale_factor(thumbs.shape[-1], cols, min_width)
    thumbs = thumbs.repeat_interleave(s, dim=-2).repeat_interleave(s, dim=-1)  # (N, 3, s*h, s*w)
    rows = max(1, -(-thumbs.shape[0] // cols))
    blank = torch.full((rows * cols - thumbs.shape[0], *thumbs.shape[1:]), 255, dtype=torch.uint8)
    x = F.pad(torch.cat([thumbs, blank]), (0, pad, 0, pad), value=255)  # (rows*cols, 3, s*h+pad, s*w+pad)
    x = rearrange(x, "(r c) ch h w -> ch (r h) (c w)", c=cols)
    return F.pad(x, (pad, 0, pad, 0), value=255)


def recon_grid(x: torch.Tensor, x_hat: torch.Tensor, modality: str, cols: int = 8) -> torch.Tensor:
    """Originals on the odd rows, their reconstructions under them: uint8 (3, H, W)."""
    cols = min(cols, x.shape[0])
    a, b = thumbnails(x, modality), thumbnails(x_hat, modality)
    rows = []
    for r in range(0, x.shape[0], cols):
        rows += [a[r:r + cols], b[r:r + cols]]
        if rows[-1].shape[0] < cols:  # a short last row: pad the originals' row so the pair stays aligned
            rows[-2] = torch.cat([rows[-2], torch.full_like(a[:cols - rows[-2].shape[0]], 255)])
    return grid(torch.cat(rows), cols)


def class_grids(shown: dict[str | None, list[torch.Tensor]], per_class: int, cols: int,
                square: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The sample grids from `shown`: class name (None: unconditional) -> its first thumbnails (3, h, w).

    Returns ({class name: a near-square grid of its first `per_class`}, the overview: one row of up to `cols` per
    class, or with `square` a cols x cols square of the unconditional samples)."""
    grids = {name: grid(torch.stack(t[:per_class]), math.ceil(math.sqrt(len(t[:per_class]))))
             for name, t in shown.items() if name is not None}
    if square:
        return grids, grid(torch.stack(shown[None][:cols ** 2]), cols)
    cols = min(cols, *(len(t) for t in shown.values()))
    return grids, grid(torch.cat([torch.stack(t[:cols]) for t in shown.values()]), cols)


def write_png(image: torch.Tensor, path: str | Path) -> None:
    """uint8 (3, H, W) -> a PNG file (data.image's PNG writer), written whole or not at all."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pixels = np.ascontiguousarray(image.permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
    write_bytes_atomic(path, image_to_png(Image.fromarray(pixels)))
