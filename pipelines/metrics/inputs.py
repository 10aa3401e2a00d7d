"""What evaluation compares, read from disk: the files a sample manifest lists (by their file type) and a media split
as the integers its files store, whole or shard by shard.

    samples, labels, manifest = load_samples("runs/d/samples", data_manifest_sha)  # uint8 (N,3,H,W) | int16 (N,1,T)
    images, labels = load_split("runs/d/shards", "train", limit=500, seed=0)       # center crops, uint8
    for shard, batch in shard_batches("runs/d/shards", "val", 64, shards=[0, 2]):  # eval-view MediaBatches

A split is always read in one order, the one-process order: its shards in name order, each shard's samples in file
order (what `data.reader.media_loader(train=False)` gives one process). These readers never split the shards over
processes themselves (media_loader does, by RANK/WORLD_SIZE); pipelines/metrics/shares.py decides who reads what.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import soundfile
import torch
from PIL import Image

from data.errors import UserError
from data.media import to_integers
from data.reader import MediaBatch, _collate, decode_sample  # the reader's own batch type, collation, decoding
from data.shards import (MAKE_SHARDS_HINT, MANIFEST, ManifestError, file_url, iter_shard_samples, read_manifest,
                         shard_urls)
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


def from_integers(x: torch.Tensor) -> torch.Tensor:
    """The integers a file stores (uint8 pixels 0..255 | int16 samples) -> float32 in [-1, 1]; data.media.to_integers
    gives the same integers back."""
    if x.dtype == torch.uint8:
        return x.float() / 127.5 - 1
    if x.dtype == torch.int16:
        return x.float() / 32768
    raise ValueError(f"inputs: expected uint8 pixels or int16 samples, got {x.dtype}")


SAMPLES_FORMAT, SAMPLES_VERSIONS = "simvq-samples", (1, 2)  # what pipelines/sample.py writes (now version 2)
SHARD_FORMATS = {"simvq-media-shards": "media", "simvq-token-shards": "token"}


def _again(samples_dir: str | Path) -> str:
    return f"make the samples again: `python -m pipelines.sample --out=<a new directory>` (--samples={samples_dir})"


def sample_manifest(samples_dir: str | Path, data_manifest_sha: str) -> tuple[dict, list[dict]]:
    """(a sample manifest, its per-sample records), refusing a manifest of another format or version, a damaged one,
    and samples whose tokens came from another dataset."""
    path = Path(samples_dir) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{path} not found: run `python -m pipelines.sample --out={samples_dir}` first")
    try:
        manifest = json.loads(path.read_bytes())
    except ValueError:  # not UTF-8 or not JSON
        raise UserError(f"{path} is not a JSON manifest; {_again(samples_dir)}") from None
    kind = manifest.get("format") if isinstance(manifest, dict) else None
    if kind in SHARD_FORMATS:
        raise UserError(f"{samples_dir} holds {SHARD_FORMATS[kind]} shards, not samples: pass the --out of "
                        f"`python -m pipelines.sample` as --samples (shards go to --data)")
    if kind != SAMPLES_FORMAT or manifest.get("version") not in SAMPLES_VERSIONS:
        version = manifest.get("version") if isinstance(manifest, dict) else None
        raise UserError(f"{path} has format {kind!r} version {version!r}; this code reads {SAMPLES_FORMAT!r} versions "
                        f"{', '.join(map(str, SAMPLES_VERSIONS))}: {_again(samples_dir)}")
    key = "samples" if manifest["version"] >= 2 else "images"  # 1: png files only
    items = manifest.get(key)
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("path"), str) for i in items):
        raise UserError(f"{path} has no {key!r} list of sample records (each with a path); {_again(samples_dir)}")
    if manifest.get("extension", "png") not in SAMPLE_READERS:
        raise UserError(f"{path}: extension {manifest['extension']!r} is not one of {sorted(SAMPLE_READERS)}; "
                        f"{_again(samples_dir)}")
    source = manifest.get("source_manifest_sha256")
    if source != data_manifest_sha:
        raise UserError(f"{path}: these samples come from a prior trained on data with manifest sha256 {source}, "
                        f"but --data's manifest is {data_manifest_sha}: evaluate against the dataset the prior "
                        f"was trained on")
    return manifest, items


def read_samples(samples_dir: str | Path, manifest: dict, items: Sequence[dict]) -> torch.Tensor:
    """The files of `items` (records of `manifest`), stacked: uint8 (n, 3, H, W) | int16 (n, 1, T). A path that
    leaves `samples_dir`, a missing or unreadable file and files of different shapes are UserErrors."""
    read = SAMPLE_READERS[manifest.get("extension", "png")]
    xs = []
    for item in items:
        relative = Path(os.path.normpath(item["path"]))  # lexical: a symlinked media/ folder stays allowed
        if relative.is_absolute() or relative.parts[:1] == ("..",):
            raise UserError(f"{Path(samples_dir) / 'manifest.json'} lists {item['path']!r}, outside {samples_dir}: "
                            f"it was not written by pipelines.sample; {_again(samples_dir)}")
        try:
            xs.append(read(Path(samples_dir) / relative))
        except (OSError, ValueError, RuntimeError, SyntaxError) as e:  # missing, truncated (PIL, libsndfile)
            raise UserError(f"{Path(samples_dir) / relative}: cannot read this sample file ({e}); "
                            f"{_again(samples_dir)}") from None
        if xs[-1].shape != xs[0].shape:
            raise UserError(f"{Path(samples_dir) / relative} holds {tuple(xs[-1].shape)}, the other samples "
                            f"{tuple(xs[0].shape)}; {_again(samples_dir)}")
    return torch.stack(xs)


def load_samples(samples_dir: str | Path, data_manifest_sha: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(the files a sample manifest lists, stacked: uint8 (N, 3, H, W) | int16 (N, 1, T); labels (N,); the manifest),
    refusing samples whose tokens came from another dataset."""
    manifest, items = sample_manifest(samples_dir, data_manifest_sha)
    return read_samples(samples_dir, manifest, items), sample_labels(items), manifest


def sample_labels(items: Sequence[dict]) -> torch.Tensor:
    return torch.tensor([item.get("label", -1) for item in items], dtype=torch.long)


def shard_batches(data: str | Path, split: str, batch_size: int, shards: Iterable[int] | None = None
                  ) -> Iterator[tuple[int, MediaBatch]]:
    """(shard index, MediaBatch) over the listed shards of a split (all by default), eval view (center crops), each
    shard's samples in file order. A batch never spans two shards, so a shard gives the same batches whichever
    process reads it, and a model sees the same batch shapes."""
    manifest = read_manifest(data)
    paths = shard_urls(data, manifest.shard_names.get(split, []))
    for index in range(len(paths)) if shards is None else shards:
        batch = []
        for key, fields in iter_shard_samples(paths[index]):
            batch.append(decode_sample(paths[index], key, fields, manifest.spec, manifest.field_name,
                                       len(manifest.class_names), None))
            if len(batch) == batch_size:
                yield index, _collate(batch)
                batch = []
        if batch:
            yield index, _collate(batch)


def read_shards(data: str | Path, split: str, shards: Iterable[int] | None = None
                ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(shard index, uint8 (n, 3, H, W) | int16 (n, 1, T), labels (n,)) per listed shard of a split (all by
    default), center-cropped, as the files of the modality store them."""
    spec = read_manifest(data).spec
    parts: dict[int, tuple[list, list]] = {}
    for index, batch in shard_batches(data, split, 256, shards):
        xs, ys = parts.setdefault(index, ([], []))
        xs.append(to_integers(batch.x, spec))
        ys.append(batch.labels)
    return [(index, torch.cat(xs), torch.cat(ys)) for index, (xs, ys) in parts.items()]


def load_split(data: str, split: str, limit: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N, 3, H, W) | int16 (N, 1, T), labels (N,)) of a whole split, center-cropped, as the files of the
    modality store them: exactly what evaluation compares against. With a limit: a class-stratified random subset of
    that many (`stratified_subset`), not the first ones."""
    parts = read_shards(data, split)
    if not parts:
        raise ManifestError(f"{file_url(data, MANIFEST)} has no {split!r} samples; raise --val_fraction or add files, "
                            f"then {MAKE_SHARDS_HINT}")
    x, y = torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])
    if not limit or limit >= len(y):
        return x, y
    keep = stratified_subset(y, limit, seed)
    return x[keep], y[keep]
