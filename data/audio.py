"""Audio bytes <-> tensors (the "audio" entry of data.media.MODALITIES).

Shard time (`normalise_audio`): any wav/flac -> 16-bit PCM mono WAV at the spec's `sample_rate` (channels
averaged, resampled with torchaudio.functional.resample), full length; crops happen at read time. Any sample
format libsndfile reads (8-bit, 24-bit, float) becomes floats first; a float file louder than full scale (peak > 1)
is scaled down to peak 1, never clipped. A file with NaN/Inf samples, one that is silent at 16 bits, and a WAV
whose header declares more sample bytes than the file holds (truncated: libsndfile would silently read the rest)
raise MediaError, a counted skip: NaN would poison every loss, silence teaches nothing, and a cut file is not the
recording.
Read time (`decode_audio`): (1, clip) in [-1, 1], a random (train) or centered (eval) crop of
`clip_seconds`; clips shorter than that are zero-padded at the end.
Write time (`audio_file_bytes`): (1, T) in [-1, 1] -> 16-bit PCM WAV of `to_int16` samples, the one int16
conversion (the shard writer uses it too).
"""

from __future__ import annotations

import io
import random
import struct
from typing import TYPE_CHECKING

import numpy as np
import soundfile
import torch
import torchaudio.functional

from data.errors import BYTESIO_REPR, MediaError

if TYPE_CHECKING:
    from data.media import MediaSpec

AUDIO_EXTENSIONS = (".wav", ".flac")


def wav_truncation(data: bytes) -> tuple[int, int] | None:
    """(declared, present) sample bytes of a RIFF/RIFX WAVE whose `data` chunk is cut short, else None. A size of 0
    or 0xFFFFFFFF is what streaming writers put when they do not know the length: not a truncation."""
    if data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return None
    order, pos = ("<" if data[:4] == b"RIFF" else ">"), 12
    while pos + 8 <= len(data):
        size = struct.unpack(f"{order}I", data[pos + 4 : pos + 8])[0]
        if data[pos : pos + 4] == b"data":
            present = len(data) - pos - 8
            return (size, present) if size not in (0, 0xFFFFFFFF) and present < size else None
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    return None


def read_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Bytes -> (mono float32 (T,), sample rate). Channels are averaged."""
    if not data:
        raise MediaError("zero-byte file")
    cut = wav_truncation(data)
    if cut is not None:
        raise MediaError(f"truncated WAV: its header declares {cut[0]} bytes of samples, the file holds {cut[1]}")
    try:
        wav, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (T, C)
    except Exception as exc:  # libsndfile names the stream "<_io.BytesIO object at 0x...>": say "the file"
        raise MediaError(f"not a readable audio file: {BYTESIO_REPR.sub('the file', str(exc))}") from exc
    if wav.shape[0] == 0:
        raise MediaError("audio file has no samples")
    return wav.mean(axis=1), rate


def normalise_audio(data: bytes, spec: MediaSpec) -> bytes:
    wav, rate = read_audio(data)
    if not np.isfinite(wav).all():
        raise MediaError(f"NaN or Inf samples ({int((~np.isfinite(wav)).sum())} of {len(wav)})")
    peak = float(np.abs(wav).max())
    if peak < 2**-16:  # rounds to 0 (or -1 LSB) at 16 bits
        raise MediaError("silent: every sample is below half a 16-bit step")
    if peak > 1:  # only float files can exceed full scale: keep the waveform, PCM_16 would clip it
        wav = wav / np.float32(peak)
    if rate != spec.sample_rate:
        resampled = torchaudio.functional.resample(torch.from_numpy(wav), rate, spec.sample_rate)
        wav = resampled.numpy()
    # PCM_16 clips to [-1, 1): the same range the tokenizer sees, and half the bytes of float32.
    return pcm16_wav(to_int16(torch.from_numpy(wav)), spec.sample_rate)


def to_int16(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> int16 PCM (any shape), bit for bit what libsndfile writes for float input to PCM_16
    (so shards made before this function existed are unchanged): scaled to int32 full scale (x * 2**31, rounded half
    to even, clipped), then its top 16 bits (an arithmetic shift, i.e. floor). Reading back with soundfile divides
    by 32768."""
    scaled = x.detach().double().clamp(-1, 1) * 2**31  # exact for float32 input
    return (scaled.round().clamp(-2**31, 2**31 - 1).long() >> 16).to(torch.int16)


def pcm16_wav(samples: torch.Tensor, sample_rate: int) -> bytes:
    """int16 mono samples (T,) -> 16-bit PCM WAV bytes."""
    buf = io.BytesIO()
    soundfile.write(buf, samples.cpu().numpy(), sample_rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def audio_file_bytes(x: torch.Tensor, spec: MediaSpec) -> bytes:
    """One clip (1, T) in [-1, 1] -> 16-bit PCM WAV bytes at `spec.sample_rate` (`to_int16` samples)."""
    return pcm16_wav(to_int16(x[0]), spec.sample_rate)


def decode_audio(data: bytes, spec: MediaSpec, rng: random.Random | None) -> torch.Tensor:
    wav, rate = read_audio(data)
    if rate != spec.sample_rate:
        raise MediaError(f"shard audio is {rate} Hz but the manifest says {spec.sample_rate} Hz")
    clip = spec.clip_samples
    if len(wav) < clip:
        wav = np.pad(wav, (0, clip - len(wav)))  # short clips: zero-pad at the end
    start = (len(wav) - clip) // 2 if rng is None else rng.randint(0, len(wav) - clip)
    return torch.from_numpy(np.ascontiguousarray(wav[start : start + clip])).unsqueeze(0)  # (1, T)
