"""recon/mel: the audio recipe's reconstruction loss (docs/AUDIO_SPEC.md §2, Vocos' MelSpecReconstructionLoss):
L1 between log(clamp(mel, 1e-7)) of x and x_hat, torchaudio's MelSpectrogram (Hann, center, power 1, HTK mels).

The paper's sizes are for 24 kHz: n_fft 1024, hop 256, 100 mels. At another rate the hop keeps the paper's frame
rate (256 / 24 kHz = 10.7 ms) and n_fft is the power of two at or above the paper's window duration, so no mel band
is narrower than an FFT bin (at 16 kHz: n_fft 1024, hop 171). `LossConfig.mel_*` set them explicitly.
"""

import torch
from torch import nn

PAPER_RATE, PAPER_N_FFT, PAPER_HOP = 24_000, 1024, 256
LOG_FLOOR = 1e-7  # Vocos' safe_log clamp


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
