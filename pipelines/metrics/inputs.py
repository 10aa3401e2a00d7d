"""What evaluation compares, read from disk: the files a sample manifest lists (by their file type) and a media split
as uint8 images.

    samples, labels, manifest = load_samples("runs/d/samples", data_manifest_sha)  # uint8 (N,3,H,W) | int16 (N,1,T)
    images, labels = load_split("runs/d/shards", "train", limit=500, seed=0)       # center crops, uint8
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import soundfile
import torch
from PIL import Image

from data.errors import UserError
from data.media import to_integers
from data.shards import read_manifest
from data.reader import MediaBatch, media_loader
from pipelines.metrics.subsets import stratified_subset


def read_png(path: Path) -> torch.Tensor:
    """uint8 (3, H, W), the pixels the file stores."""
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def read_wav(path: Path) -> torch.Tensor:
    """int16 (1, T), the 16-bit PCM samples the file stores (mono)."""
    samples, _ = soundfile.read(path, dtype="int16", always_2d=True)  # (T, 1)
    return torch.from_numpy(samples.T.copy())


# A sample manifest's file type -> the reader of its files (what data.media.to_integers made of the decoder output).
SAMPLE_READERS = {"png": read_png, "wav": read_wav}


def load_samples(samples_dir: str | Path, data_manifest_sha: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(the files a sample manifest lists, stacked: uint8 (N, 3, H, W) | int16 (N, 1, T); labels (N,); the manifest),
    refusing samples whose tokens came from another dataset."""
    path = Path(samples_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{path} not found: run `python -m pipelines.sample --out={samples_dir}` first")
    manifest = json.loads(path.read_text())
    source = manifest.get("source_manifest_sha256")
    if source != data_manifest_sha:
        raise UserError(f"{path}: these samples come from a prior trained on data with manifest sha256 {source}, "
                        f"but --data's manifest is {data_manifest_sha}: evaluate against the dataset the prior "
                        f"was trained on")
    items = manifest["samples"] if manifest["version"] >= 2 else manifest["images"]  # version 1: png files only
    read = SAMPLE_READERS[manifest.get("extension", "png")]
    samples = torch.stack([read(Path(samples_dir) / item["path"]) for item in items])
    return samples, torch.tensor([item.get("label", -1) for item in items]), manifest


def load_split(data: str, split: str, limit: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N, 3, H, W) | int16 (N, 1, T), labels (N,)) of a split, center-cropped, as the files of the modality
    store them: exactly what evaluation compares against. With a limit: a class-stratified random subset of that many
    (`stratified_subset`), not the first ones."""
    spec = read_manifest(data).spec
    xs, ys = [], []
    for batch in media_loader(data, split, 256, train=False):
        xs.append(to_integers(batch.x, spec))
        ys.append(batch.labels)
    x, y = torch.cat(xs), torch.cat(ys)
    if not limit or limit >= len(y):
        return x, y
    keep = stratified_subset(y, limit, seed)
    return x[keep], y[keep]


def keep_labels(loader: Iterable[MediaBatch], labels: list[torch.Tensor]) -> Iterator[MediaBatch]:
    """The loader's batches, unchanged, with their labels appended to `labels` (on_batch sees pixels only)."""
    for batch in loader:
        labels.append(batch.labels)
        yield batch
