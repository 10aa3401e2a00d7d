"""Per-clip reconstruction metrics of audio, batched in torch, one value per clip.

Clips are (B, 1, T) in the model's [-1, 1], reference first. Pure torch: they run on any device, inside the training
loop's evaluation, and need no library beyond torch and torchaudio's filter banks.

- `snr`: signal-to-noise ratio in dB (higher is better).
- `si_sdr`: scale-invariant signal-to-distortion ratio in dB (Le Roux et al. 2019; higher is better): SNR after
  removing the mean and the best scaling of the reference, so a gain change is not counted as error.
- `mel_distance`: DAC's multi-scale mel distance (lower is better), the sum over 7 STFT scales of the L1 distance
  between log10 mel magnitudes, as DAC's `MelSpectrogramLoss` computes it under its training config (conf/base.yml:
  windows 32 ... 2048, mels 5 ... 320, hop = window / 4, Hann, centred reflect-padded STFT, librosa (Slaney) filters
  from 0 Hz to Nyquist, magnitude (pow 1), clamp 1e-5, no linear-magnitude term). AUDIO_SPEC §5's anchors use it.
- `stft_distance`: multi-resolution STFT distance (Yamamoto et al. 2020, Parallel WaveGAN; lower is better): spectral
  convergence + L1 of log magnitudes, averaged over three resolutions.

The library-backed perceptual metrics (PESQ, STOI, ViSQOL, V/UV F1, UTMOS) live in `speech.py`.
"""
from __future__ import annotations

import torch

from data.errors import UserError
from tokenizer.losses.mel import DAC_MEL_CLAMP, DAC_MEL_SCALES, multiscale_mel_distance  # noqa: F401 (re-exported)
from tokenizer.losses.mel import stft_magnitude as _magnitude

MIN_NOISE = 1e-10  # a perfect reconstruction would give SNR = inf; this caps it so means stay finite

# Parallel WaveGAN's (n_fft, hop, window) resolutions; STFT_LOG_CLAMP keeps log|X| finite on digital silence.
STFT_RESOLUTIONS: tuple[tuple[int, int, int], ...] = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))
STFT_LOG_CLAMP = 1e-7


def _check_pair(name: str, x: torch.Tensor, x_hat: torch.Tensor, min_samples: int = 1) -> None:
    if x.shape != x_hat.shape or x.dim() != 3:
        raise ValueError(f"audio {name}: expected two (B, C, T) tensors of equal shape, got {tuple(x.shape)} and "
                         f"{tuple(x_hat.shape)}")
    if x.shape[-1] < min_samples:
        raise UserError(f"audio {name}: clips of {x.shape[-1]} samples are shorter than its largest window "
                        f"({min_samples} samples); evaluate longer clips")


def fit_length(x: torch.Tensor, length: int) -> torch.Tensor:
    """(..., T) -> (..., length): the centre `length` samples, or zero-padded equally on both sides."""
    t = x.shape[-1]
    if t >= length:
        return x[..., (t - length) // 2:(t - length) // 2 + length]
    return torch.nn.functional.pad(x, ((length - t) // 2, length - t - (length - t) // 2))


def snr(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B,) signal-to-noise ratio in dB of each clip: 10 log10(sum x^2 / sum (x - x_hat)^2), in float64 sums."""
    _check_pair("snr", x, x_hat)
    signal = x.double().pow(2).flatten(1).sum(1)  # (B,)
    noise = (x.double() - x_hat.double()).pow(2).flatten(1).sum(1)  # (B,)
    return (10 * torch.log10(signal.clamp_min(MIN_NOISE) / noise.clamp_min(MIN_NOISE))).to(x.dtype)


def si_sdr(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B,) SI-SDR in dB of each clip: x_hat is projected on the (zero-mean) reference x, the projection is the
    target and the rest the distortion; float64 sums, capped like `snr` so identical clips stay finite."""
    _check_pair("si_sdr", x, x_hat)
    ref = x.double().flatten(1)  # (B, C*T)
    est = x_hat.double().flatten(1)
    ref = ref - ref.mean(1, keepdim=True)
    est = est - est.mean(1, keepdim=True)
    scale = (est * ref).sum(1, keepdim=True) / ref.pow(2).sum(1, keepdim=True).clamp_min(MIN_NOISE)  # (B, 1)
    target = scale * ref
    signal = target.pow(2).sum(1)  # (B,)
    noise = (est - target).pow(2).sum(1)  # (B,)
    return (10 * torch.log10(signal.clamp_min(MIN_NOISE) / noise.clamp_min(MIN_NOISE))).to(x.dtype)


def mel_distance(x: torch.Tensor, x_hat: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """(B,) DAC multi-scale mel distance of each clip (module docstring): exactly 0 for identical clips."""
    _check_pair("mel_distance", x, x_hat, min_samples=DAC_MEL_SCALES[-1][0] // 2 + 1)  # reflect pad < length
    return multiscale_mel_distance(x, x_hat, sample_rate).to(x.dtype)


def stft_distance(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(B,) multi-resolution STFT distance of each clip: mean over STFT_RESOLUTIONS of spectral convergence
    ||S - S_hat||_F / ||S||_F plus mean |log S - log S_hat| (magnitudes S). 0 for identical clips."""
    _check_pair("stft_distance", x, x_hat, min_samples=max(n for n, _, _ in STFT_RESOLUTIONS) // 2 + 1)
    B = x.shape[0]
    both = torch.cat([x, x_hat]).flatten(0, 1).float()  # (2 * B * C, T)
    total = torch.zeros(B, dtype=torch.float32, device=x.device)
    for n_fft, hop, win in STFT_RESOLUTIONS:
        ref, est = _magnitude(both, n_fft, hop, win).reshape(2, B, -1).unbind(0)  # (B, C*F*frames) each
        convergence = (ref - est).norm(dim=1) / ref.norm(dim=1).clamp_min(MIN_NOISE)
        log_l1 = (ref.clamp_min(STFT_LOG_CLAMP).log() - est.clamp_min(STFT_LOG_CLAMP).log()).abs().mean(1)
        total += convergence + log_l1
    return (total / len(STFT_RESOLUTIONS)).to(x.dtype)
