"""Pictures a person looks at to judge a tokenizer or a prior: the recon grid and the sample grids.

Every sample becomes a thumbnail (uint8 (3, h, w)) by its modality (`THUMBNAILS`): an image is its own pixels, an
audio clip its log-magnitude spectrogram (time left to right, low frequencies at the bottom, the 80 dB under the
clip's peak through the magma colour map), where the eye finds pitch, formants, noise and silence that a waveform
hides (issue 11). Thumbnails are tiled row-major with white borders; small ones are first upscaled by an integer
factor (nearest: no pixel is invented) until the grid is at least `MIN_WIDTH` pixels wide, since 16x16 digits tiled
8 across (136x34 px, issue 9) are too small to see.

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
SPEC_HEIGHT, SPEC_WIDTH = 96, 192  # px of one audio thumbnail: frequency rows (0 .. Nyquist) x time columns
SPEC_RANGE_DB = 80.0  # shown below each clip's loudest bin; quieter is black (librosa's top_db convention)
SPEC_FLOOR = 1e-5  # magnitude floor (-100 dB re a full-scale sine, below 16-bit noise): a clip under it is silent
COLOUR_MAP = "magma"  # perceptually uniform, dark = quiet, so silence reads as black


def image_thumbnails(x: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] -> uint8 (N, 3, H, W): the pixels a PNG of them holds."""
    return to_uint8(x)


def colour_table(name: str = COLOUR_MAP) -> torch.Tensor:
    """uint8 (256, 3): matplotlib's colour map at 256 levels (from its registry: no pyplot figure, no state)."""
    import matplotlib  # noqa: PLC0415  only audio grids need it

    rgb = matplotlib.colormaps[name](np.linspace(0, 1, 256))[:, :3]  # (256, 3) floats in [0, 1]
    return torch.from_numpy(np.round(rgb * 255).astype(np.uint8))


def log_spectrogram(x: torch.Tensor, height: int = SPEC_HEIGHT, width: int = SPEC_WIDTH) -> torch.Tensor:
    """Clips (N, 1, T) -> (N, height, width) in [0, 1]: log magnitude from SPEC_RANGE_DB below each clip's peak (0)
    up to the peak (1); row 0 is the *highest* frequency, so low frequencies sit at the bottom as in every plot.

    Linear frequency: an STFT of n_fft = 2 * height (Hann window), so row r shows bin height - 1 - r, i.e.
    (height - 1 - r) / height of the Nyquist frequency (the Nyquist bin is dropped). About `width` frames
    (hop T // width, centred), their power averaged (or repeated, for very short clips) into `width` columns."""
    x = x.detach().float().cpu()[:, 0]  # (N, T)
    n_fft = 2 * height
    window = torch.hann_window(n_fft)
    if x.shape[-1] < n_fft:  # stft needs a frame's worth of samples
        x = F.pad(x, (0, n_fft - x.shape[-1]))
    spec = torch.stft(x, n_fft, hop_length=max(1, x.shape[-1] // width), window=window, center=True,
                      pad_mode="constant", return_complex=True)  # (N, n_fft/2 + 1, frames)
    power = spec[:, :height].abs().square() / (window.sum() / 2) ** 2  # (N, height, frames); full-scale sine ~ 1
    power = F.adaptive_avg_pool1d(power, width)  # (N, height, width)
    db = 10 * torch.log10(power.clamp_min(SPEC_FLOOR**2))
    peak = db.amax(dim=(1, 2), keepdim=True)  # (N, 1, 1)
    level = ((db - peak) / SPEC_RANGE_DB + 1).clamp(0, 1)
    level = level * (peak > 20 * math.log10(SPEC_FLOOR))  # a silent clip is black, not its own peak
    return level.flip(1)  # (N, height, width): low frequencies at the bottom


def spectrogram_thumbnails(x: torch.Tensor, height: int = SPEC_HEIGHT, width: int = SPEC_WIDTH) -> torch.Tensor:
    """Clips (N, 1, T) in [-1, 1] -> uint8 (N, 3, height, width): `log_spectrogram` through COLOUR_MAP."""
    level = log_spectrogram(x, height, width)  # (N, height, width) in [0, 1]
    rgb = colour_table()[(level * 255).round().long()]  # (N, height, width, 3)
    return rgb.permute(0, 3, 1, 2).contiguous()  # (N, 3, height, width)


THUMBNAILS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "image": image_thumbnails,
    "audio": spectrogram_thumbnails,
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
