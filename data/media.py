"""The modality registry: what every stage needs to know about a kind of media, in one table.

`MediaSpec` (stored in the shard manifest) names a modality and its resolution policy; `MODALITIES[name]`
says, for that modality, the file format of a sample (png | wav: the field in a shard and the suffix of a
sample file), the source extensions, the model's dims and channels, the input shape, and the functions of
the three moments that touch the bytes of a file:

1. Shard time (`normalise`): an arbitrary user file is turned *once* into canonical shard bytes.
2. Read time (`decode`): canonical bytes -> float tensor in [-1, 1] (rng=None: the deterministic eval crop).
3. Write time (`to_file_bytes`): a model's output sample in [-1, 1] -> the bytes of a file a person opens,
   through `to_integers` (uint8 for images: data.image.to_uint8; int16 for audio: data.audio.to_int16),
   the one place for each conversion.
The details per modality are in data/image.py and data/audio.py.

Audio is a preset of the same code (`modality="audio"` selects another `Modality`), not a second pipeline.
Anything that cannot be decoded raises `MediaError` with a reason about the bytes ("zero-byte file", "not an
image: ...", "truncated JPEG image (...)", "corrupt PNG image: ..."); the shard writer catches it, logs it with
the file's origin and records both in the manifest.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from data.errors import UserError
from data.audio import AUDIO_EXTENSIONS, audio_file_bytes, decode_audio, normalise_audio, to_int16
from data.image import IMAGE_EXTENSIONS, decode_image, image_file_bytes, normalise_image, to_uint8

RESIZE_POLICIES = ("short_side", "center_crop", "none")


class MediaSpecError(UserError, ValueError):
    """A MediaSpec setting out of range or of the wrong type (a command-line value, or a hand-edited manifest)."""


@dataclass(frozen=True)
class MediaSpec:
    """How media are normalised at shard time and decoded at read time. Stored in the shard manifest."""

    modality: str = "image"  # "image" | "audio": picks the entry of MODALITIES
    size: int = 128  # image: short side at shard time and crop side at read time, in pixels
    resize: str = "short_side"  # image shard-time policy: short_side | center_crop | none (see module doc)
    sample_rate: int = 24_000  # audio: every clip is resampled to this rate at shard time (paper: 24 kHz)
    clip_seconds: float = 1.0  # audio: crop length at read time (paper: 1-second crops)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise MediaSpecError(f"modality={self.modality!r}: choose one of {sorted(MODALITIES)}")
        if self.resize not in RESIZE_POLICIES:
            raise MediaSpecError(f"resize={self.resize!r}: choose one of {list(RESIZE_POLICIES)}")
        for name, kind in (("size", int), ("sample_rate", int), ("clip_seconds", (int, float))):
            value = getattr(self, name)
            if not isinstance(value, kind) or isinstance(value, bool) or not value > 0:
                raise MediaSpecError(f"{name}={value!r}: it must be a number > 0 (size and sample_rate integers)")

    @property
    def clip_samples(self) -> int:
        return int(round(self.sample_rate * self.clip_seconds))

    @property
    def dims(self) -> int:
        """Spatial dims of a sample (2 image, 1 audio): the tokenizer's `--model.dims`."""
        return MODALITIES[self.modality].dims

    @property
    def channels(self) -> int:
        """Channels of a decoded sample (3 RGB, 1 mono): the tokenizer's `--model.in_channels`."""
        return MODALITIES[self.modality].channels

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one decoded sample, the model's input without the batch dim: (3, size, size) | (1, clip)."""
        return (self.channels, *MODALITIES[self.modality].shape(self))

    @property
    def extension(self) -> str:
        """File extension of one sample's bytes (png | wav), in a shard and as a sample file."""
        return MODALITIES[self.modality].field


class Modality(NamedTuple):
    field: str  # file extension of a sample's bytes: the webdataset field in a shard, the suffix of a sample file
    extensions: tuple[str, ...]  # source files picked up when scanning a folder
    dims: int  # spatial dims of a sample: 2 (H, W) or 1 (T,); the tokenizer's --model.dims
    channels: int  # channels of a decoded sample; the tokenizer's --model.in_channels
    shape: Callable[[MediaSpec], tuple[int, ...]]  # spatial shape of a decoded sample: (H, W) or (T,)
    normalise: Callable[[bytes, MediaSpec], bytes]  # shard time
    decode: Callable[[bytes, MediaSpec, random.Random | None], torch.Tensor]  # read time
    to_int: Callable[[torch.Tensor], torch.Tensor]  # [-1, 1] -> the integers its files store (uint8 | int16)
    file_bytes: Callable[[torch.Tensor, MediaSpec], bytes]  # write time: one sample (C, *shape) -> file bytes


MODALITIES: dict[str, Modality] = {
    "image": Modality("png", IMAGE_EXTENSIONS, 2, 3, lambda spec: (spec.size, spec.size), normalise_image,
                      decode_image, to_uint8, image_file_bytes),
    "audio": Modality("wav", AUDIO_EXTENSIONS, 1, 1, lambda spec: (spec.clip_samples,), normalise_audio,
                      decode_audio, to_int16, audio_file_bytes),
}


def normalise(data: bytes, spec: MediaSpec) -> bytes:
    """Source file bytes -> canonical shard bytes (raises MediaError)."""
    return MODALITIES[spec.modality].normalise(data, spec)


def decode(data: bytes, spec: MediaSpec, rng: random.Random | None) -> torch.Tensor:
    """Canonical shard bytes -> float tensor in [-1, 1]; rng=None means the deterministic eval crop."""
    return MODALITIES[spec.modality].decode(data, spec, rng)


def to_integers(x: torch.Tensor, spec: MediaSpec) -> torch.Tensor:
    """Floats in [-1, 1] -> the integers a file of this modality stores: uint8 (image) | int16 (audio)."""
    return MODALITIES[spec.modality].to_int(x)


def to_file_bytes(x: torch.Tensor, spec: MediaSpec) -> bytes:
    """One sample (C, *S) in [-1, 1], e.g. a decoder output, -> the bytes of a `.{spec.extension}` file."""
    if x.dim() != spec.dims + 1 or x.shape[0] != spec.channels:
        raise ValueError(f"one {spec.modality} sample is (channels={spec.channels}, {spec.dims} spatial dims), e.g. "
                         f"{spec.input_shape}; got shape {tuple(x.shape)}")
    return MODALITIES[spec.modality].file_bytes(x, spec)


def modality_of(dims: int, channels: int) -> str | None:
    """The modality whose samples a model with `dims` and `channels` takes, or None."""
    return next((name for name, m in MODALITIES.items() if (m.dims, m.channels) == (dims, channels)), None)
