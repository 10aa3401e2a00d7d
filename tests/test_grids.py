"""The pictures a person judges a run by: small samples are upscaled (nearest) until a grid is >= MIN_WIDTH wide,
reconstructions sit under their originals, audio is drawn as waveforms."""
import math

import torch

from pipelines.metrics.grids import MIN_WIDTH, PAD, class_grids, grid, recon_grid, thumbnails, upscale_factor


def digits(n: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)  # (n, 3, size, size)


def test_small_images_are_upscaled_by_nearest_to_the_minimum_width():
    images = digits(16)
    out = grid(images, cols=8)  # the demo's recon grid: 8 columns of 16 px were 136 px wide
    s = 4  # ceil(512 / (8 * 16))
    assert upscale_factor(16, 8) == s and out.shape == (3, 2 * (s * 16 + PAD) + PAD, 8 * (s * 16 + PAD) + PAD)
    assert out.shape[-1] >= MIN_WIDTH
    for i in (0, 9):  # thumbnail i sits at row i // 8, column i % 8, each pixel an s x s block of itself
        top, left = PAD + (i // 8) * (s * 16 + PAD), PAD + (i % 8) * (s * 16 + PAD)
        block = out[:, top:top + s * 16, left:left + s * 16]
        assert torch.equal(block, images[i].repeat_interleave(s, 1).repeat_interleave(s, 2))
    assert (out[:, :PAD] == 255).all() and (out[:, :, :PAD] == 255).all()  # white borders


def test_large_images_are_not_upscaled():
    images = digits(2, size=300)
    out = grid(images, cols=2)
    assert upscale_factor(300, 2) == 1 and out.shape == (3, 300 + 2 * PAD, 2 * (300 + PAD) + PAD)


def test_recon_grid_puts_each_reconstruction_under_its_original():
    x = torch.linspace(-1, 1, 10).view(10, 1, 1, 1).expand(10, 3, 16, 16)  # image i is flat grey level i
    x_hat = -x
    out = recon_grid(x, x_hat, "image", cols=8)  # rows: originals 0-7, recons 0-7, originals 8-9, recons 8-9
    s = upscale_factor(16, 8)
    cell = s * 16 + PAD
    pixel = lambda row, col: out[:, PAD + row * cell, PAD + col * cell]  # top-left pixel of a cell
    u8 = thumbnails(torch.cat([x, x_hat]), "image")[:, :, 0, 0]  # (20, 3) the grey of each
    assert torch.equal(pixel(0, 3), u8[3]) and torch.equal(pixel(1, 3), u8[10 + 3])
    assert torch.equal(pixel(2, 1), u8[9]) and torch.equal(pixel(3, 1), u8[10 + 9])
    assert (pixel(2, 2) == 255).all() and out.shape[1] == PAD + 4 * cell  # short rows are padded, stay paired


def test_audio_thumbnails_are_waveforms():
    t = torch.arange(4096) / 8000
    tone = 0.9 * torch.sin(2 * math.pi * 440 * t).view(1, 1, -1)  # (1, 1, T)
    silence = torch.zeros(1, 1, 4096)
    thumbs = thumbnails(torch.cat([tone, silence]), "audio")  # (2, 3, h, w) uint8
    assert thumbs.dtype == torch.uint8 and thumbs.shape[1] == 3
    inked = (thumbs != 255).any(1)  # (2, h, w)
    h = thumbs.shape[2]
    # a loud tone fills most of the height in every column; silence leaves only the zero line
    assert inked[0].sum(0).min() > 0.8 * h
    zero_line = inked[1].nonzero()[:, 0].unique()
    assert len(zero_line) == 1 and abs(int(zero_line) - (h - 1) / 2) <= 0.5
    out = recon_grid(torch.cat([tone, silence]), torch.cat([silence, tone]), "audio")
    assert out.dtype == torch.uint8 and out.shape[0] == 3 and out.shape[-1] >= MIN_WIDTH


def test_class_grids_lay_out_one_row_per_class_or_a_square():
    shown = {"a": list(digits(5)), "b": list(digits(5))}
    per_class, overview = class_grids(shown, per_class=4, cols=10, square=False)
    s = upscale_factor(16, 2)  # each class grid: its first 4 in 2 columns
    side = PAD + 2 * (s * 16 + PAD)
    assert set(per_class) == {"a", "b"} and per_class["a"].shape == (3, side, side)
    s = upscale_factor(16, 5)  # the overview: 2 class rows of min(10, 5) samples
    assert overview.shape == (3, PAD + 2 * (s * 16 + PAD), PAD + 5 * (s * 16 + PAD))
    _, square = class_grids({None: list(digits(9))}, per_class=4, cols=3, square=True)
    s = upscale_factor(16, 3)
    assert square.shape == (3, PAD + 3 * (s * 16 + PAD), PAD + 3 * (s * 16 + PAD))
