"""recon/mel: the audio recipe's reconstruction loss (docs/AUDIO_SPEC.md §2, Vocos' MelSpecReconstructionLoss):
L1 between log(clamp(mel, 1e-7)) of x and x_hat, torchaudio's MelSpectrogram (Hann, center, power 1, HTK mels).

The paper's sizes are for 24 kHz: n_fft 1024, hop 256, 100 mels. At another rate the hop keeps the paper's frame
rate (256 / 24 kHz = 10.7 ms) and n_fft is the power of two at or above the paper's window duration, so no mel band
is narrower than an FFT bin (at 16 kHz: n_fft 1024, hop 171). `LossConfig.mel_*` set them explicitly.

recon/mel_ms: DAC's multi-scale mel distance (`multiscale_mel_distance`, also the evaluation's `mel_distance`): the
sum over 7 STFT scales (windows 32 ... 2048, mels 5 ... 320, hop = window / 4, Hann, centred reflect padding, Slaney
filters 0 Hz to Nyquist, magnitude, clamp 1e-5) of the L1 distance between log10 mels, as DAC's
`MelSpectrogramLoss` computes it under its conf/base.yml. Its short windows (2 ms at 16 kHz) judge the timing of
each pitch pulse, which the single 64 ms mel above cannot see.
"""

import torch
from torch import nn

PAPER_RATE, PAPER_N_FFT, PAPER_HOP = 24_000, 1024, 256
LOG_FLOOR = 1e-7  # Vocos' safe_log clamp
# DAC conf/base.yml, MelSpectrogramLoss: (window length, mel bands) per scale; hop = window // 4.
DAC_MEL_SCALES: tuple[tuple[int, int], ...] = ((32, 5), (64, 10), (128, 20), (256, 40), (512, 80), (1024, 160),
                                               (2048, 320))
DAC_MEL_CLAMP = 1e-5  # DAC's clamp_eps: magnitudes below it are equal (silence does not dominate the log distance)


def mel_sizes(sample_rate: int, n_fft: int = 0, hop: int = 0) -> tuple[int, int]:
    """(n_fft, hop) for `sample_rate`; a non-zero argument is taken as it is."""
    scale = sample_rate / PAPER_RATE
    if not n_fft:
        n_fft = 1 << max(0, round(PAPER_N_FFT * scale) - 1).bit_length()  # next power of two
    if not hop:
        hop = max(1, round(PAPER_HOP * scale))
    return n_fft, hop


class MelLoss(nn.Module):
    """(B, C, T) x 2 -> scalar L1 of the log-mel spectrograms (channels judged separately); exactly 0 when equal."""

    def __init__(self, sample_rate: int, n_fft: int = 0, hop: int = 0, n_mels: int = 100):
        super().__init__()
        import torchaudio  # here: only audio recipes pay for its import

        self.n_fft, self.hop = mel_sizes(sample_rate, n_fft, hop)
        self.mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=self.n_fft,
                                                        hop_length=self.hop, n_mels=n_mels, center=True, power=1)
        empty = int((self.mel.mel_scale.fb.amax(dim=0) == 0).sum())
        if empty:
            raise ValueError(f"recon/mel at {sample_rate} Hz with n_fft {self.n_fft}: {empty} of {n_mels} mel bands "
                             f"hold no FFT bin; lower `mel_n_mels` or raise `mel_n_fft`")

    def log_mel(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # STFT and log in float32 under autocast
            return self.mel(x.float().flatten(0, -2)).clamp(min=LOG_FLOOR).log()  # (B*C, T) -> (B*C, mels, frames)

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        return (self.log_mel(x_hat) - self.log_mel(x)).abs().mean()


def stft_magnitude(x: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
    """(N, T) -> (N, n_fft // 2 + 1, frames) STFT magnitude, Hann window, centred with reflect padding."""
    window = torch.hann_window(win, dtype=x.dtype, device=x.device)
    return torch.stft(x, n_fft, hop, win, window, center=True, pad_mode="reflect", return_complex=True).abs()


def multiscale_mel_distance(x: torch.Tensor, x_hat: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """(B, C, T) x 2 -> (B,) DAC multi-scale mel distance of each clip (module docstring), in float32 whatever
    autocast is active; exactly 0 for identical clips. Clips need more than 1,024 samples (the reflect padding)."""
    import torchaudio

    B = x.shape[0]
    with torch.autocast(x.device.type, enabled=False):
        both = torch.cat([x, x_hat]).flatten(0, 1).float()  # (2 * B * C, T): one STFT per scale for both sides
        total = torch.zeros(B, dtype=torch.float32, device=x.device)
        for window, n_mels in DAC_MEL_SCALES:
            fbank = torchaudio.functional.melscale_fbanks(window // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate,
                                                          norm="slaney", mel_scale="slaney").to(both)  # (F, M)
            mag = stft_magnitude(both, window, window // 4, window)  # (2BC, F, frames)
            mel = torch.einsum("nft,fm->nmt", mag, fbank).clamp_min(DAC_MEL_CLAMP).log10()  # (2BC, M, frames)
            ref, est = mel.reshape(2, B, -1).unbind(0)  # (B, C*M*frames) each
            total = total + (ref - est).abs().mean(1)
    return total


class MultiScaleMelLoss(nn.Module):
    """recon/mel_ms: (B, C, T) x 2 -> scalar, the batch mean of `multiscale_mel_distance`."""

    def __init__(self, sample_rate: int):
        super().__init__()
        self.sample_rate = sample_rate

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        return multiscale_mel_distance(x, x_hat, self.sample_rate).mean()
