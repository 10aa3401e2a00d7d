"""Classical speech codecs as baselines, run on the same clips as the tokenizer: Opus and Codec2.

    decoded = opus_round_trip(x, sample_rate=24000, kbps=12)       # (B, 1, T) in, (B, 1, T) out, same rate
    decoded = codec2_round_trip(x, sample_rate=24000, bps=1200)

Both call the codecs' command-line tools (Debian packages opus-tools and codec2), one clip at a time through
temporary files, and return the decoded clips at the input rate and length, aligned with the input, so every metric
of `audio.py` and `speech.py` applies unchanged (AUDIO_SPEC §5 lists the anchors they give).
- Opus: `opusenc --bitrate <kbps> --speech` (VBR, its default) from 16-bit WAV at the input rate, `opusdec --rate
  48000` (opusdec removes the encoder's pre-skip itself), resampled back to the input rate.
- Codec2: 8 kHz 16-bit raw `c2enc <bps>` / `c2dec <bps>`; its algorithmic delay is found by cross-correlation with
  the 8 kHz input (searched up to CODEC2_MAX_DELAY_S) and removed, then the clip is resampled back.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile
import torch
import torchaudio

from data.errors import UserError

APT_PACKAGE = {"opusenc": "opus-tools", "opusdec": "opus-tools", "c2enc": "codec2", "c2dec": "codec2"}
TOOLS = {"opus": ("opusenc", "opusdec"), "codec2": ("c2enc", "c2dec")}  # what each codec's round trip runs
OPUS_DECODE_RATE = 48000  # Opus always decodes at 48 kHz internally; take that and resample once
OPUS_KBPS_RANGE = (6.0, 256.0)  # opusenc's accepted --bitrate range per channel
CODEC2_RATE = 8000
CODEC2_MODES = (3200, 2400, 1600, 1400, 1300, 1200)  # the constant-bitrate modes c2enc takes
CODEC2_MAX_DELAY_S = 0.1  # its delay is a few frames of 10-40 ms; a larger lag would be a false correlation peak


def require_tool(name: str) -> str:
    """The path of command-line tool `name`, or a UserError naming the apt package that provides it."""
    path = shutil.which(name)
    if path is None:
        raise UserError(f"codec baseline: `{name}` is not installed; run `apt-get update && apt-get install -y "
                        f"{APT_PACKAGE.get(name, name)}`")
    return path


def missing_tools(codec: str) -> list[str]:
    """The command-line tools of `codec` (a key of TOOLS) that are not installed."""
    return [name for name in TOOLS[codec] if shutil.which(name) is None]


def _run(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(args[0]).name} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")


def _fit(y: torch.Tensor, length: int) -> torch.Tensor:
    """(T',) cut or zero-padded at the end to (length,)."""
    return y[:length] if y.numel() >= length else torch.nn.functional.pad(y, (0, length - y.numel()))


def _check_clips(x: torch.Tensor) -> None:
    if x.dim() != 3 or x.shape[1] != 1:
        raise UserError(f"codec baseline: expected (B, 1, T) mono clips, got {tuple(x.shape)}; mix down to mono")


def opus_round_trip(x: torch.Tensor, sample_rate: int, kbps: float) -> torch.Tensor:
    """(B, 1, T) clips in [-1, 1] through Opus at `kbps` kbit/s -> (B, 1, T) decoded at `sample_rate`."""
    _check_clips(x)
    if not OPUS_KBPS_RANGE[0] <= kbps <= OPUS_KBPS_RANGE[1]:
        raise UserError(f"codec baseline: Opus bitrate {kbps} kbps is outside opusenc's {OPUS_KBPS_RANGE} range")
    enc, dec = require_tool("opusenc"), require_tool("opusdec")
    out = torch.empty_like(x)
    with tempfile.TemporaryDirectory() as tmp:
        wav_in, bits, wav_out = (str(Path(tmp) / name) for name in ("in.wav", "coded.opus", "out.wav"))
        for i, clip in enumerate(x[:, 0].detach().cpu().clamp(-1, 1)):
            soundfile.write(wav_in, clip.numpy(), sample_rate, subtype="PCM_16")
            _run(enc, "--quiet", "--speech", "--bitrate", f"{kbps}", wav_in, bits)
            _run(dec, "--quiet", "--rate", str(OPUS_DECODE_RATE), bits, wav_out)
            y, rate = soundfile.read(wav_out, dtype="float32", always_2d=True)  # (T48, channels)
            y = torchaudio.functional.resample(torch.from_numpy(y[:, 0].copy()), rate, sample_rate)
            out[i, 0] = _fit(y, x.shape[-1]).to(x)
    return out


def _delay(ref: np.ndarray, y: np.ndarray, max_lag: int) -> int:
    """Lag d in [0, max_lag] that best aligns y[d:] with ref (peak of their cross-correlation)."""
    n = len(ref) + len(y)
    corr = np.fft.irfft(np.fft.rfft(y, n) * np.conj(np.fft.rfft(ref, n)), n)  # corr[d] = sum_t y[t + d] ref[t]
    return int(np.argmax(corr[: max_lag + 1]))


def codec2_round_trip(x: torch.Tensor, sample_rate: int, bps: int) -> torch.Tensor:
    """(B, 1, T) clips in [-1, 1] through Codec2 at `bps` bit/s (8 kHz) -> (B, 1, T) decoded at `sample_rate`,
    with Codec2's delay removed."""
    _check_clips(x)
    if bps not in CODEC2_MODES:
        raise UserError(f"codec baseline: Codec2 mode {bps} is not one of {list(CODEC2_MODES)}")
    enc, dec = require_tool("c2enc"), require_tool("c2dec")
    x8 = torchaudio.functional.resample(x[:, 0].detach().cpu().double().clamp(-1, 1), sample_rate, CODEC2_RATE)
    out = torch.empty_like(x)
    with tempfile.TemporaryDirectory() as tmp:
        raw_in, bits, raw_out = (str(Path(tmp) / name) for name in ("in.raw", "coded.bit", "out.raw"))
        for i, clip in enumerate(x8.numpy()):
            (np.round(clip * 32767).clip(-32768, 32767).astype("<i2")).tofile(raw_in)
            _run(enc, str(bps), raw_in, bits)
            _run(dec, str(bps), bits, raw_out)
            y = np.fromfile(raw_out, dtype="<i2").astype(np.float64) / 32768
            d = _delay(clip, y, int(CODEC2_MAX_DELAY_S * CODEC2_RATE))
            y = torchaudio.functional.resample(torch.from_numpy(y[d:].copy()), CODEC2_RATE, sample_rate)
            out[i, 0] = _fit(y, x.shape[-1]).to(x)
    return out
