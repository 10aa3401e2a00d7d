"""Image bytes <-> tensors (the "image" entry of data.media.MODALITIES).

Shard time (`normalise_image`): any PIL-readable file -> PNG of 8-bit RGB (integer greys scaled by the bit
depth their mode/header declares, see `to_rgb`), resized by the spec's policy: "short_side" (default) resizes
the short side to `size` and keeps the aspect ratio, so that the paper's training augmentation (random crop
along the long side, SimVQ spec section 3) still has something to crop at read time; "center_crop" also
center-crops to size x size (smallest shards); "none" stores the original resolution (the reader resizes).
Read time (`decode_image`): (3, size, size) in [-1, 1]; short side resized to `size` if needed, random crop
(train) or center crop (eval). No flip, as in the paper.
Write time (`image_file_bytes`): (3, H, W) in [-1, 1] -> PNG of `to_uint8` pixels, the one uint8 conversion.
"""

from __future__ import annotations

import io
import random
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from data.errors import BYTESIO_REPR, MediaError

if TYPE_CHECKING:
    from data.media import MediaSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
WHITE = (255, 255, 255)  # transparent pixels are composited onto white (their RGB is often garbage)


def to_rgb(img: Image.Image, white: int | None = None) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is composited on white. Integer greys are rescaled so that
    `white` (default `white_level(img)`) becomes 255: PIL's own convert() clips I;16 to 255, which turns
    a 16-bit photo white. The range comes from the mode/header, never from the pixel values: a dark
    16-bit image (all values <= 255) must stay dark, not be read as 8-bit. Float greys ("F") are the
    exception: they declare no range, so [0, 1] is assumed when the values fit, else 0..255."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":  # palette: its transparency lives in info, go through RGBA to honour it
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode.startswith("I") or img.mode == "F":
        grey = np.asarray(img, dtype=np.float64)
        if img.mode == "F":  # no declared range: [0, 1] when it fits, else taken as 0..255
            grey = grey * 255.0 if grey.max(initial=0.0) <= 1.0 else grey
        else:
            grey = grey * (255.0 / (white or white_level(img)))
        grey8 = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return Image.fromarray(grey8).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, ... (PIL raises for modes it cannot convert)


def white_level(img: Image.Image) -> int:
    """The largest value of an integer grey image ("I;16*" or "I"), from its mode and file header.
    "I" is PIL's 32-bit container: TIFF declares the real depth (BitsPerSample, SampleFormat 2 =
    signed), while PGM/PPM with maxval > 255 open as "I" holding 16-bit values. Read it before anything
    (exif_transpose, copy) replaces the image object, since that drops the header."""
    if img.mode.startswith("I;16"):
        return 2**16 - 1
    tags = getattr(img, "tag_v2", {})
    bits, sample_format = tags.get(258, 16), tags.get(339, 1)  # TIFF: an int, or a tuple with one per channel
    bits = bits[0] if isinstance(bits, tuple) else bits
    sample_format = sample_format[0] if isinstance(sample_format, tuple) else sample_format
    return 2 ** (bits - 1 if sample_format == 2 else bits) - 1


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))  # short side exactly `size`
    return img.resize(new, Image.Resampling.BICUBIC)


def crop_square(img: Image.Image, size: int, rng: random.Random | None) -> Image.Image:
    """Center crop when rng is None (eval), else a uniformly random size x size window (train)."""
    w, h = img.size
    if rng is None:
        left, top = (w - size) // 2, (h - size) // 2
    else:
        left, top = rng.randint(0, w - size), rng.randint(0, h - size)
    return img.crop((left, top, left + size, top + size))


def open_image(data: bytes) -> Image.Image:
    """Bytes -> fully loaded RGB image (load() forces decoding so truncated files fail here, not later).
    Raises MediaError saying what is wrong with the bytes; the caller names the file."""
    if not data:
        raise MediaError("zero-byte file")
    claimed = sniff_image_format(data)
    try:
        img = Image.open(io.BytesIO(data))
        claimed = img.format or claimed
        img.load()
        white = white_level(img) if img.mode.startswith("I") else None  # before exif_transpose drops the header
        img = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF
        return to_rgb(img, white)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise MediaError(image_problem(exc, data, claimed)) from exc


# File signatures, to tell "not an image at all" from "an image whose header is damaged".
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"GIF8": "GIF", b"BM": "BMP",
              b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}


def sniff_image_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in SIGNATURES.items() if data.startswith(magic)), None)


def image_problem(exc: Exception, data: bytes, claimed: str | None) -> str:
    """A reason a person can act on, instead of PIL's "cannot identify image file <_io.BytesIO ...>".
    `claimed`: the format the file says it is (PIL's, else its signature), None when unrecognised."""
    kind = f"{claimed} image" if claimed else "image"
    if isinstance(exc, Image.DecompressionBombError):
        return f"{kind} too large to decode safely: {exc}"
    message = BYTESIO_REPR.sub("the file", str(exc))
    if isinstance(exc, EOFError) or "truncated" in message.lower():  # "image file is truncated", "Truncated File Read"
        return f"truncated {kind} ({message})"
    if isinstance(exc, UnidentifiedImageError):
        if claimed:
            return f"corrupt {kind}: the header cannot be parsed"
        # the first bytes often say what the file really is: b'<html>' from a failed download, ...
        return f"not an image: unrecognised format ({len(data)} bytes starting {data[:12]!r})"
    return f"corrupt {kind}: {type(exc).__name__}: {message}"


def normalise_image(data: bytes, spec: MediaSpec) -> bytes:
    img = open_image(data)
    if spec.resize != "none":
        img = resize_short_side(img, spec.size)
    if spec.resize == "center_crop":
        img = crop_square(img, spec.size, rng=None)
    return image_to_png(img)


def image_to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    to_rgb(img).save(buf, format="PNG")  # lossless, so the shard holds exactly the normalised pixels
    return buf.getvalue()


def decode_image(data: bytes, spec: MediaSpec, rng: random.Random | None) -> torch.Tensor:
    img = crop_square(resize_short_side(open_image(data), spec.size), spec.size, rng)
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8))  # (H, W, 3)
    return pixels.permute(2, 0, 1).float() / 127.5 - 1.0  # (3, H, W) in [-1, 1]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> uint8 [0, 255] (any shape), rounded to nearest like a PNG writer would; the inverse
    of `decode_image`'s `/ 127.5 - 1` up to that rounding."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_file_bytes(x: torch.Tensor, spec: MediaSpec) -> bytes:
    """One image (3, H, W) in [-1, 1] -> PNG bytes (`to_uint8` pixels, lossless)."""
    pixels = to_uint8(x).permute(1, 2, 0).cpu().numpy()  # (3, H, W) -> (H, W, 3)
    return image_to_png(Image.fromarray(np.ascontiguousarray(pixels)))
