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

Each yields `SourceItem`s with a stable key, so the train/val split (a hash of the key) does not move
when the generator is rerun.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

from data.image import image_to_png
from data.media import MODALITIES

BUILTIN_SOURCES = ("digits", "photos")
# skimage.data images that are bundled in the wheel (others are fetched with pooch: not allowed here).
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
               "retina", "stereo_motorcycle")


class SourceItem(NamedTuple):
    key: str  # unique, stable id: the split hash and the shard's __key__ come from it
    label: int  # index into class_names, -1 when unlabelled
    origin: str  # human-readable origin (relative path), reported when the item is skipped
    read: Callable[[], bytes]  # returns the raw bytes (file contents or an already-canonical PNG)


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


def folder(root: str | Path, modality: str = "image", labels: str = "auto") -> Source:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"source folder {root} does not exist; pass --source=digits|photos|/path/to/folder")
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


def open_source(source: str, modality: str, size: int, count: int, seed: int, labels: str) -> Source:
    """`source` is a built-in name (image modality only) or a folder path."""
    if source in BUILTIN_SOURCES:
        if modality != "image":
            raise ValueError(f"built-in source {source!r} is image-only; pass a folder of wav files for audio")
        return digits(size) if source == "digits" else photos(size, count, seed)
    return folder(source, modality, labels)
