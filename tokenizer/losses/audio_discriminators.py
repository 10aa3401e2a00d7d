"""The audio recipe's discriminators (docs/AUDIO_SPEC.md §2): waveform (B, 1, T) -> one `Scores` per sub-discriminator.

    mpd  HiFi-GAN's multi-period discriminator (periods 2, 3, 5, 7, 11), hinge, each family averaged (Vocos)
    mrd  UnivNet's multi-resolution STFT-magnitude discriminator in Vocos' layout, hinge, averaged
    dac  DAC's discriminator: its MPD + a multi-band complex-STFT MRD, least squares, summed (as DAC)

Every width is a multiplier on the published channel counts (`LossConfig.mpd_width` etc.): 1.0 is the paper's,
0.25 trains on a CPU. Convolutions carry weight_norm, as in all three. Our own code after the papers' layouts.
"""

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from .gan import Scores

if TYPE_CHECKING:
    from . import LossConfig

LRELU_SLOPE = 0.1  # HiFi-GAN, UnivNet, Vocos and DAC all use 0.1
MPD_CHANNELS = (32, 128, 512, 1024, 1024)  # HiFi-GAN's DiscriminatorP at width 1
DAC_BANDS = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))  # fractions of the STFT bins


def _width(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _conv2d(c_in: int, c_out: int, kernel, stride=1, padding=0) -> nn.Module:
    return weight_norm(nn.Conv2d(c_in, c_out, kernel, stride, padding))


def _check_mono(kind: str, in_channels: int, dims: int) -> None:
    if (dims, in_channels) != (1, 1):
        raise ValueError(f"the {kind!r} discriminator judges mono waveforms (dims=1, in_channels=1), got "
                         f"dims={dims}, in_channels={in_channels}; use `patch` for images")


class PeriodDiscriminator(nn.Module):
    """(B, 1, T) -> the waveform folded into (B, 1, ceil(T/p), p) columns, then (5, 1) convs that never mix columns.

    Logits (B, 1, H, p) with H = ceil(T/p) divided by 3 (rounded up) four times. `features`: every hidden activation
    but the first, then the logits (Vocos' DiscriminatorP, which the official code uses), or all of them (`all`).
    """

    def __init__(self, period: int, width: float = 1.0, all_features: bool = False, pad_always: bool = False):
        super().__init__()
        self.period, self.all_features, self.pad_always = period, all_features, pad_always
        chans = [1] + [_width(c, width) for c in MPD_CHANNELS]
        strides = (3, 3, 3, 3, 1)
        self.convs = nn.ModuleList(_conv2d(a, b, (5, 1), (s, 1), (2, 0))
                                   for a, b, s in zip(chans[:-1], chans[1:], strides))
        self.post = _conv2d(chans[-1], 1, (3, 1), 1, (1, 0))

    def forward(self, x: torch.Tensor) -> Scores:
        b, c, t = x.shape
        pad = -t % self.period
        if self.pad_always and pad == 0:
            pad = self.period  # DAC pads a whole period when T is already a multiple
        if pad:
            x = F.pad(x, (0, pad), mode="reflect")
        h = x.view(b, c, (t + pad) // self.period, self.period)  # (B, 1, T/p, p): one column per phase
        features = []
        for i, conv in enumerate(self.convs):
            h = F.leaky_relu(conv(h), LRELU_SLOPE)
            if i > 0 or self.all_features:
                features.append(h)
        logits = self.post(h)
        return Scores(logits, features + [logits] if not self.all_features else features)


class MultiPeriodDiscriminator(nn.ModuleList):
    objective = "hinge"

    def __init__(self, periods: Sequence[int], width: float = 1.0):
        super().__init__(PeriodDiscriminator(p, width) for p in periods)

    def forward(self, x: torch.Tensor) -> list[Scores]:
        return [d(x) for d in self]


class ResolutionDiscriminator(nn.Module):
    """(B, 1, T) -> |STFT| with a rectangular window (B, 1, n_fft/2 + 1, T/hop + 1), then five convs (Vocos'
    DiscriminatorR after UnivNet): logits (B, 1, F', T') with F' = F / 2^5 and T' = frames / 2^3, rounded up."""

    def __init__(self, n_fft: int, hop: int, win: int, width: float = 1.0):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.register_buffer("window", torch.ones(win), persistent=False)  # rectangular, as UnivNet/Vocos
        ch = _width(64, width)
        layers = [(1, (7, 5), (2, 2), (3, 2)), (ch, (5, 3), (2, 1), (2, 1)), (ch, (5, 3), (2, 2), (2, 1)),
                  (ch, (3, 3), (2, 1), (1, 1)), (ch, (3, 3), (2, 2), (1, 1))]  # (in, kernel, stride (F, T), pad)
        self.convs = nn.ModuleList(_conv2d(c_in, ch, k, s, p) for c_in, k, s, p in layers)
        self.post = _conv2d(ch, 1, (3, 3), 1, (1, 1))

    def forward(self, x: torch.Tensor) -> Scores:
        with torch.autocast(x.device.type, enabled=False):  # the STFT in float32 under bf16/fp16 autocast
            spec = torch.stft(x.float().flatten(0, 1), self.n_fft, self.hop, window=self.window, center=True,
                              return_complex=True).abs()  # (B, F, frames)
        h = spec.unsqueeze(1)  # (B, 1, F, frames)
        features = []
        for conv in self.convs:
            h = F.leaky_relu(conv(h), LRELU_SLOPE)
            features.append(h)
        logits = self.post(h)
        return Scores(logits, features + [logits])


class MultiResolutionDiscriminator(nn.ModuleList):
    objective = "hinge"

    def __init__(self, resolutions: Sequence[Sequence[int]], width: float = 1.0):
        super().__init__(ResolutionDiscriminator(*r, width=width) for r in resolutions)

    def forward(self, x: torch.Tensor) -> list[Scores]:
        return [d(x) for d in self]


class BandDiscriminator(nn.Module):
    """DAC's MRD: the complex STFT (Hann window, hop n_fft/4) as (real, imag) channels, (B, 2, frames, bins), split
    into frequency bands, five convs per band, the bands joined along frequency, one post conv. The framing is
    torch.stft(center=True), not audiotools' match_stride padding: the same layout, not DAC's exact frames."""

    def __init__(self, n_fft: int, width: float = 1.0, bands=DAC_BANDS):
        super().__init__()
        self.n_fft, self.hop = n_fft, n_fft // 4
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        bins = n_fft // 2 + 1
        self.bands = [(int(lo * bins), int(hi * bins)) for lo, hi in bands]
        ch = _width(32, width)

        def stack() -> nn.ModuleList:
            layers = [(2, (3, 9), (1, 1), (1, 4)), (ch, (3, 9), (1, 2), (1, 4)), (ch, (3, 9), (1, 2), (1, 4)),
                      (ch, (3, 9), (1, 2), (1, 4)), (ch, (3, 3), (1, 1), (1, 1))]  # (in, kernel, stride (T, F), pad)
            return nn.ModuleList(_conv2d(c_in, ch, k, s, p) for c_in, k, s, p in layers)

        self.band_convs = nn.ModuleList(stack() for _ in self.bands)
        self.post = _conv2d(ch, 1, (3, 3), 1, (1, 1))

    def forward(self, x: torch.Tensor) -> Scores:
        with torch.autocast(x.device.type, enabled=False):
            spec = torch.stft(x.float().flatten(0, 1), self.n_fft, self.hop, window=self.window, center=True,
                              return_complex=True)  # (B, F, frames)
        spec = torch.view_as_real(spec).permute(0, 3, 2, 1)  # (B, F, frames, 2) -> (B, 2, frames, F)
        features, outs = [], []
        for (lo, hi), convs in zip(self.bands, self.band_convs):
            h = spec[..., lo:hi]
            for conv in convs:
                h = F.leaky_relu(conv(h), LRELU_SLOPE)
                features.append(h)
            outs.append(h)
        logits = self.post(torch.cat(outs, dim=-1))  # (B, 1, frames, F')
        return Scores(logits, features)  # DAC's feature matching leaves the logits out


class DACDiscriminator(nn.ModuleList):
    """DAC's discriminator: MPD (periods 2..11) + band MRD (n_fft 2048, 1024, 512) on the DC-free, peak-normalised
    waveform; least-squares losses summed over all eight, feature matching without the logits."""
    objective = "lsgan"

    def __init__(self, width: float = 1.0, periods: Sequence[int] = (2, 3, 5, 7, 11),
                 fft_sizes: Sequence[int] = (2048, 1024, 512)):
        super().__init__([PeriodDiscriminator(p, width, all_features=True, pad_always=True) for p in periods]
                         + [BandDiscriminator(n, width) for n in fft_sizes])

    def forward(self, x: torch.Tensor) -> list[Scores]:
        x = x - x.mean(dim=-1, keepdim=True)  # DAC's preprocessing: no DC offset, peak 0.8
        x = 0.8 * x / (x.abs().amax(dim=-1, keepdim=True) + 1e-9)
        return [d(x) for d in self]


def build_mpd(cfg: "LossConfig", in_channels: int, dims: int) -> nn.Module:
    _check_mono("mpd", in_channels, dims)
    return MultiPeriodDiscriminator(cfg.mpd_periods, cfg.mpd_width)


def build_mrd(cfg: "LossConfig", in_channels: int, dims: int) -> nn.Module:
    _check_mono("mrd", in_channels, dims)
    return MultiResolutionDiscriminator(cfg.mrd_resolutions, cfg.mrd_width)


def build_dac(cfg: "LossConfig", in_channels: int, dims: int) -> nn.Module:
    _check_mono("dac", in_channels, dims)
    return DACDiscriminator(cfg.dac_width)
