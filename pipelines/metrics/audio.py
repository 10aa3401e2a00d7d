"""Per-clip reconstruction metrics of audio, batched in torch, one value per clip.

Clips are (B, 1, T) in the model's [-1, 1]. Only the basics for now (L1 is common to every modality and computed by
`reconstruction_metrics`); the paper's audio metrics (mel distance, STFT distance, PESQ/STOI-style scores) belong here
when the audio recipe lands.
"""
from __future__ import annotations

import torch

MIN_NOISE = 1e-10  # a perfect reconstruction would give SNR = inf; this caps it so means stay finite


def snr(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B,) signal-to-noise ratio in dB of each clip: 10 log10(sum x^2 / sum (x - x_hat)^2), in float64 sums."""
    if x.shape != x_hat.shape or x.dim() != 3:
        raise ValueError(f"audio snr: expected two (B, C, T) tensors of equal shape, got {tuple(x.shape)} and "
                         f"{tuple(x_hat.shape)}")
    signal = x.double().pow(2).flatten(1).sum(1)  # (B,)
    noise = (x.double() - x_hat.double()).pow(2).flatten(1).sum(1)  # (B,)
    return (10 * torch.log10(signal.clamp_min(MIN_NOISE) / noise.clamp_min(MIN_NOISE))).to(x.dtype)
