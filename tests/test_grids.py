"""The pictures a person judges a run by: small samples are upscaled (nearest) until a grid is >= MIN_WIDTH wide,
reconstructions sit under their originals, audio is drawn as log-magnitude spectrograms (low frequencies at the
bottom)."""
import math

import torch

from pipelines.metrics.grids import (MIN_WIDTH, PAD, SPEC_HEIGHT, SPEC_WIDTH, class_grids, colour_table, grid,
                                    log_spectrogram, recon_grid, thumbnails, upscale_factor)


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


def tone(freq: float, rate: int = 16_000, seconds: float = 1.0, start: float = 0.0) -> torch.Tensor:
    t = torch.arange(int(rate * seconds)) / rate
    return (0.5 * torch.sin(2 * math.pi * freq * t) * (t >= start)).view(1, 1, -1)  # (1, 1, T)


def test_a_tone_lights_the_row_of_its_frequency_low_at_the_bottom():
    rate, h = 16_000, SPEC_HEIGHT
    rows = {}
    for freq in (250.0, 1_000.0, 3_000.0, 7_000.0):
        level = log_spectrogram(tone(freq, rate))[0]  # (h, w) in [0, 1], row 0 = the highest frequency
        assert level.shape == (SPEC_HEIGHT, SPEC_WIDTH)
        rows[freq] = int(level.mean(1).argmax())
        assert rows[freq] == h - 1 - round(freq / (rate / 2) * h)  # bin freq / (rate / n_fft), n_fft = 2h, flipped
        assert level[rows[freq]].min() > 0.95  # the tone is there in every column, at the clip's peak
        assert (level < 0.05).float().mean() > 0.5  # and most of the picture is >= 76 dB quieter: dark
    assert rows[7_000.0] < rows[3_000.0] < rows[1_000.0] < rows[250.0]  # higher tones higher up


def test_spectrogram_thumbnails_time_runs_left_to_right_and_silence_is_black():
    late = tone(1_000.0, start=0.5)  # silent first half
    thumbs = thumbnails(torch.cat([late, torch.zeros_like(late)]), "audio")
    assert thumbs.dtype == torch.uint8 and thumbs.shape == (2, 3, SPEC_HEIGHT, SPEC_WIDTH)
    black, brightest = colour_table()[0], colour_table()[255]
    row = SPEC_HEIGHT - 1 - round(1_000 / 8_000 * SPEC_HEIGHT)
    assert (thumbs[0, :, row, : SPEC_WIDTH // 2 - 2] == black[:, None]).all()  # before the tone: nothing
    assert (thumbs[0, :, row, SPEC_WIDTH // 2 + 2 :] == brightest[:, None]).all()  # the tone, at the peak colour
    assert (thumbs[1] == black[:, None, None]).all()  # silence: black, not its own (meaningless) peak
    assert len({tuple(c) for c in colour_table().tolist()}) == 256  # a colour map, not a grey ramp repeated


def test_audio_grids_are_wide_enough_and_keep_originals_above_reconstructions():
    x, x_hat = torch.cat([tone(300.0), tone(3_000.0)]), torch.cat([tone(3_000.0), tone(300.0)])
    out = recon_grid(x, x_hat, "audio")  # 2 columns: originals, then the reconstructions under them
    s = upscale_factor(SPEC_WIDTH, 2)
    assert s == 2 and out.shape == (3, PAD + 2 * (s * SPEC_HEIGHT + PAD), PAD + 2 * (s * SPEC_WIDTH + PAD))
    assert out.shape[-1] >= MIN_WIDTH
    cell = lambda r, c: out[:, PAD + r * (s * SPEC_HEIGHT + PAD):, PAD + c * (s * SPEC_WIDTH + PAD):][  # noqa: E731
        :, : s * SPEC_HEIGHT : s, : s * SPEC_WIDTH : s]  # one thumbnail, its upscaling undone
    a, b = thumbnails(x, "audio"), thumbnails(x_hat, "audio")
    assert torch.equal(cell(0, 0), a[0]) and torch.equal(cell(1, 0), b[0]) and torch.equal(cell(1, 1), b[1])
    assert not torch.equal(cell(0, 0), cell(1, 0))  # a 300 Hz original over its 3 kHz "reconstruction"
    one = grid(thumbnails(tone(440.0), "audio"), cols=1)  # a lone clip is still >= MIN_WIDTH wide
    assert one.shape[-1] == PAD + 3 * SPEC_WIDTH + PAD >= MIN_WIDTH


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
