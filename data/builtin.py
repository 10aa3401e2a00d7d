"""Where media come from: a user folder, or a built-in demo dataset that ships with installed packages
(so the whole pipeline runs offline).

- folder: recursive scan (sorted, hidden files and folders skipped) for the modality's extensions
  (images: jpg/jpeg/png/webp/bmp; audio: wav/flac). Key = the relative path with every '.' turned into
  '_' (webdataset splits a tar member name at the first '.' of its basename). Labels: with
  `labels="auto"` (default) the folder is labelled when every file sits inside a first-level sub-folder,
  and the class is that sub-folder's name (class names sorted, index = position). Adding a class folder
  later therefore renumbers the classes: re-shard and retrain the prior. Items are listed in path order,
  i.e. grouped by class; the shard writer (data/shards.py) shuffles them, and drops a class none of whose
  files is readable (renumbering the others).

Built-ins:
- `digits`: scikit-learn's `load_digits` (1,797 greyscale 8x8 digits, labels '0'..'9', values 0..16),
  upsampled with bicubic interpolation to `size` x `size` and stored as RGB (grey replicated).
- `photos`: seeded random square crops of the colour photographs bundled with `skimage.data`
  (only those that need no download), each crop resized to `size` x `size`; unlabelled.
- `spoken-digits` (audio): "zero" .. "nine" said by many synthetic voices (data/speech.py), labels
  0..9 = the digit, each clip trimmed of silence and centred in exactly 1 s at `sample_rate`: the
  class-conditional prior's data (SC09-like).
- `spoken-digit-strings` (audio): random strings of digits ("four one nine seven ..."), 2-4 s each,
  unlabelled: tokenizer training and reconstruction metrics (STOI/PESQ/ViSQOL need >= 2 s).

Each yields `SourceItem`s with a stable key, so the train/val split (a hash of the key) does not move
when the generator is rerun. The spoken sources also give each item a `group`, its voice, which the
split hashes instead of the key: every clip of a voice lands in the same split (speaker-disjoint val).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image

from data import speech
from data.audio import pcm16_wav, to_int16
from data.errors import MediaError
from data.image import image_to_png
from data.media import MODALITIES

BUILTIN_SOURCES = ("digits", "photos", "spoken-digits", "spoken-digit-strings")
BUILTIN_MODALITY = {"digits": "image", "photos": "image", "spoken-digits": "audio", "spoken-digit-strings": "audio"}
# skimage.data images that are bundled in the wheel (others are fetched with pooch: not allowed here).
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
               "retina", "stereo_motorcycle")


class SourceItem(NamedTuple):
    key: str  # unique, stable id: the split hash and the shard's __key__ come from it
    label: int  # index into class_names, -1 when unlabelled
    origin: str  # human-readable origin (relative path), reported when the item is skipped
    read: Callable[[], bytes]  # returns the raw bytes (file contents or already-canonical PNG/WAV bytes)
    group: str = ""  # when set, the split hashes this instead of the key (e.g. the speaker: all its clips go together)


class Source(NamedTuple):
    name: str  # recorded in the manifest
    items: list[SourceItem]
    class_names: list[str]  # empty when unlabelled
    canonical: bool  # True: read() already returns normalised bytes (built-ins render at the target size)


def digits(size: int = 16) -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()  # images (1797, 8, 8) float in 0..16, target (1797,)
    pixels = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)

    def render(index: int) -> bytes:
        grey = Image.fromarray(pixels[index])
        return image_to_png(grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB"))

    items = [SourceItem(f"digits/{i:05d}", int(bunch.target[i]), f"load_digits[{i}]", lambda i=i: render(i))
             for i in range(len(pixels))]
    return Source(f"builtin:digits(size={size})", items, [str(c) for c in range(10)], canonical=True)


def _photo(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":  # returns (left, right, disparity); take the left view
        img = img[0]
    return np.asarray(img)[..., :3]  # (H, W, 3) uint8


def photos(size: int = 32, count: int = 2_000, seed: int = 0) -> Source:
    """`count` crops, round-robin over PHOTO_NAMES; crop side uniform in [size, min(H, W) / 2] so that
    crops show textures at several scales rather than whole scenes shrunk to a few pixels."""
    arrays = {name: _photo(name) for name in PHOTO_NAMES}
    rng = random.Random(f"photos/{seed}")
    boxes = []
    for i in range(count):
        name = PHOTO_NAMES[i % len(PHOTO_NAMES)]
        h, w, _ = arrays[name].shape
        side = rng.randint(min(size, min(h, w)), max(size, min(h, w) // 2))
        top, left = rng.randint(0, h - side), rng.randint(0, w - side)
        boxes.append((name, top, left, side))

    def render(box: tuple[str, int, int, int]) -> bytes:
        name, top, left, side = box
        crop = Image.fromarray(arrays[name][top : top + side, left : left + side])
        return image_to_png(crop.resize((size, size), Image.Resampling.BICUBIC))

    items = [SourceItem(f"photos/{box[0]}_{i:06d}", -1, str(box), lambda box=box: render(box))
             for i, box in enumerate(boxes)]
    return Source(f"builtin:photos(size={size},count={count},seed={seed})", items, [], canonical=True)


def _wav_reader(result: object, sample_rate: int) -> Callable[[], bytes]:
    """read() of a pre-rendered clip: its canonical PCM-16 WAV bytes, or the synthesis error (a counted skip)."""
    if isinstance(result, MediaError):
        def fail() -> bytes:
            raise result
        return fail
    data = pcm16_wav(to_int16(torch.from_numpy(result)), sample_rate)
    return lambda: data


def _render(plan: list[tuple], render, workers: int) -> list:
    """render(utterance) for the last element of every plan entry, on `workers` threads (0 = one per core)."""
    return speech.render_all(render, [u for *_, u in plan], workers or os.cpu_count() or 1)


def spoken_digits(sample_rate: int = 16_000, takes: int = 1, voices: int = 0, seed: int = 0,
                  workers: int = 0) -> Source:
    """Every voice (or `voices` of them, 0 = all) says each digit `takes` times: 148 x 10 x 1 = 1,480 clips of 1 s
    by default (all voices, espeak-ng + flite), synthesised in 11 s with 2 workers on a 2-core CPU that others
    were loading (measured; 184 synthesiser calls, as espeak-ng says a voice's ten digits in one). Synthesised
    here, all at once (1,480 x 32 KB = 47 MB at 16 kHz), because the shard writer reads items one by one;
    `workers` threads (0 = one per core) do not change the bytes."""
    chosen = speech.pick_voices(voices, seed)
    plan = speech.digit_plan(chosen, takes, seed)
    results = _render(plan, lambda u: speech.render_words(u, sample_rate), workers)
    items = []
    for (voice, take, utt), result in zip(plan, results):
        for digit, word in enumerate(speech.DIGIT_WORDS):  # the label is the index of the word said
            wav = result if isinstance(result, MediaError) else result[word]
            items.append(SourceItem(f"spoken-digits/{voice.slug}/{word}_{take}", digit,
                                    f"{voice.name} '{word}' take={take} speed={utt.speed} pitch={utt.pitch}",
                                    _wav_reader(wav, sample_rate), group=voice.name))
    return Source(f"builtin:spoken-digits(sample_rate={sample_rate},voices={len(chosen)},takes={takes},seed={seed})",
                  items, list(speech.DIGIT_WORDS), canonical=True)


def spoken_digit_strings(sample_rate: int = 16_000, per_voice: int = 3, voices: int = 0, seed: int = 0,
                         workers: int = 0) -> Source:
    """`per_voice` random digit strings (2-4 s) per voice, unlabelled: 148 x 3 = 444 strings by default
    (~21 min of speech), synthesised in 22 s with 2 workers on a 2-core CPU that others were loading (measured).
    The key ends in the digits said."""
    chosen = speech.pick_voices(voices, seed)
    plan = speech.string_plan(chosen, per_voice, seed)
    results = _render(plan, lambda u: speech.render_string(u, sample_rate), workers)
    items = []
    for (voice, index, planned), result in zip(plan, results):
        wav, said = result if not isinstance(result, MediaError) else (result, planned)
        digits = "".join(str(speech.DIGIT_WORDS.index(w)) for w in said.words)
        items.append(SourceItem(f"spoken-digit-strings/{voice.slug}/{index:03d}_{digits}", -1,
                                f"{voice.name} '{' '.join(said.words)}' speed={said.speed} pitch={said.pitch}",
                                _wav_reader(wav, sample_rate), group=voice.name))
    return Source(f"builtin:spoken-digit-strings(sample_rate={sample_rate},voices={len(chosen)},"
                  f"per_voice={per_voice},seed={seed})", items, [], canonical=True)


def folder(root: str | Path, modality: str = "image", labels: str = "auto") -> Source:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"source folder {root} does not exist; pass --source={'|'.join(BUILTIN_SOURCES)}"
                                "|/path/to/folder")
    if labels not in ("auto", "none", "subfolder"):
        raise ValueError(f"labels={labels!r}; choose auto | none | subfolder")
    extensions = MODALITIES[modality].extensions
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # skip .git, .ipynb_checkpoints
        paths += [Path(dirpath, f) for f in filenames if not f.startswith(".") and f.lower().endswith(extensions)]
    rel = sorted(p.relative_to(root).as_posix() for p in paths)
    if not rel:
        raise FileNotFoundError(f"no {modality} files ({', '.join(extensions)}) under {root}")
    at_root = [r for r in rel if "/" not in r]
    if labels == "subfolder" and at_root:
        raise ValueError(f"labels=subfolder but {len(at_root)} files sit directly in {root}, e.g. {at_root[0]}")
    labelled = labels == "subfolder" or (labels == "auto" and not at_root)
    class_names = sorted({r.split("/")[0] for r in rel}) if labelled else []
    index = {name: i for i, name in enumerate(class_names)}
    items = [SourceItem(r.replace(".", "_"), index[r.split("/")[0]] if labelled else -1, r,
                        lambda path=root / r: path.read_bytes()) for r in rel]
    return Source(f"folder:{root.resolve()}", items, class_names, canonical=False)


def open_source(source: str, modality: str, size: int, count: int, seed: int, labels: str, *,
                sample_rate: int = 16_000, voices: int = 0, workers: int = 0) -> Source:
    """`source` is a built-in name or a folder path. `count`: photos' crops, spoken-digits' takes per voice and
    digit, spoken-digit-strings' strings per voice (0 = the source's default); `voices` (0 = all), `workers`
    (0 = one per core) and `sample_rate` only concern the spoken sources."""
    if source in BUILTIN_SOURCES:
        if modality != BUILTIN_MODALITY[source]:
            raise ValueError(f"built-in source {source!r} is {BUILTIN_MODALITY[source]} data, not {modality}; "
                             f"pass --modality={BUILTIN_MODALITY[source]} or a folder")
        if source == "digits":
            return digits(size)
        if source == "photos":
            return photos(size, count or 2_000, seed)
        if source == "spoken-digits":
            return spoken_digits(sample_rate, count or 1, voices, seed, workers)
        return spoken_digit_strings(sample_rate, count or 3, voices, seed, workers)
    return folder(source, modality, labels)
