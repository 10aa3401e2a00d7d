"""The media shard reader: `media_loader`, a DataLoader of decoded `MediaBatch`es over one split.

Reading is where the randomness of training lives: shards resampled with replacement, a shuffle buffer,
random crops (data/media.py decodes each sample at read time with the manifest's `MediaSpec`), the split of
shards over ranks and DataLoader workers. Every draw comes from a `random.Random` seeded by (seed, epoch, rank,
worker, position), never from a global RNG, so a training stream can be resumed exactly (`resume_position`).
The shards are the ones the manifest names, addressed as webdataset URLs (data.shards.shard_urls): absolute local
paths, http(s) URLs or the user's `pipe:` commands, so a loader reads a URL exactly as it reads a directory.
"""

from __future__ import annotations

import itertools
import random
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from data.media import MediaSpec, decode
from data.shards import (MAKE_SHARDS_HINT, MANIFEST, ManifestError, damaged, file_url, iter_shard_samples,
                         read_manifest, shard_urls)


class MediaBatch(NamedTuple):
    x: torch.Tensor  # (B, 3, H, W) images or (B, 1, T) audio, float32 in [-1, 1]
    labels: torch.Tensor  # (B,) int64, -1 = unlabelled
    keys: list[str]  # the samples' shard keys (relative source path with '.' -> '_')


def _collate(samples: list[tuple[torch.Tensor, int, str]]) -> MediaBatch:
    xs, labels, keys = zip(*samples)
    return MediaBatch(torch.stack(xs), torch.tensor(labels, dtype=torch.long), list(keys))


def _tar_samples(shards: Iterable[dict]) -> Iterator[dict]:
    """webdataset's tarfile_to_samples as data.shards.iter_shard_samples reads them: {"__key__", "__url__", ext: bytes}
    per sample of each {"url": ...}, and a damaged tar is a ManifestError naming the shard."""
    for shard in shards:
        for key, fields in iter_shard_samples(shard["url"]):
            yield {**fields, "__key__": key, "__url__": shard["url"]}


def decode_sample(url: str, key: str, fields: dict, spec: MediaSpec, field_name: str, num_classes: int,
                  rng: random.Random | None) -> tuple[torch.Tensor, int, str]:
    """(x, label, key) of one shard sample; a sample that cannot be read (a member missing, a .cls that is no
    integer or no index into the manifest's `num_classes` class names, bytes that do not decode) is a ManifestError
    naming the shard and the key."""
    try:
        x, label = decode(fields[field_name], spec, rng), int(fields["cls"])
    except (KeyError, ValueError) as exc:  # MediaError is a ValueError
        raise damaged(url, key, exc) from None
    if not -1 <= label < num_classes:  # -1: unlabelled
        raise damaged(url, key, ValueError(f"label {label} is not an index into the manifest's {num_classes} "
                                           "class_names"))
    return x, label, key


def _decode(sample: dict, spec: MediaSpec, field_name: str, num_classes: int, rng: random.Random | None):
    return decode_sample(sample["__url__"], sample["__key__"], sample, spec, field_name, num_classes, rng)


def _train_samples(urls: list[str], spec: MediaSpec, field_name: str, num_classes: int, seed: int, epoch: int,
                   buffer: int, batch_size: int, per_worker: int, skip_batches: int):
    """One DataLoader worker's share of a training epoch: decoded samples for its batches.

    Global batch i of the epoch is made by logical worker i % W as its local batch i // W. The
    DataLoader asks physical workers round-robin from 0, so after skipping k batches physical worker p
    plays logical worker (p + k) % W: the stream then continues exactly at global batch k."""
    rank, _, worker, num_workers = wds.utils.pytorch_worker_info()
    logical = (worker + skip_batches) % num_workers
    first = max(0, -(-(skip_batches - logical) // num_workers))  # local batches of `logical` before k
    tag = f"{seed}/{epoch}/{rank}/{logical}"
    shard_rng = random.Random(f"shards/{tag}")
    shards = (dict(url=shard_rng.choice(urls)) for _ in itertools.count())  # resampled: endless, with replacement
    samples = _tar_samples(shards)
    samples = wds.shuffle(buffer, initial=buffer, rng=random.Random(f"shuffle/{tag}"))(samples)
    # Raw samples of skipped batches are drawn (to advance the shuffle) but not decoded; each crop has
    # its own seed from its position, so skipping costs no decode and changes no later crop.
    for index, sample in enumerate(itertools.islice(samples, per_worker * batch_size)):
        if index >= first * batch_size:
            yield _decode(sample, spec, field_name, num_classes, random.Random(f"crop/{tag}/{index}"))


def _eval_samples(src, spec: MediaSpec, field_name: str, num_classes: int):
    for sample in src:
        yield _decode(sample, spec, field_name, num_classes, None)


def media_loader(location: str | Path, split: str, batch_size: int, train: bool, seed: int = 0, epoch: int = 0,
                 epoch_len: int | None = None, num_workers: int = 0, skip_batches: int = 0,
                 shuffle_buffer: int = 1_000) -> DataLoader:
    """A DataLoader of `MediaBatch(x, labels, keys)` over the `split` shards at `location`: a local directory, an
    http(s) base URL or a `pipe:` template with {} for the file name (data.shards); the batches do not depend on which.

    eval (train=False): every sample of the split exactly once, whole shards split across ranks
    (`split_by_node`) then workers (`split_by_worker`); center crops; the last batch may be short.
    With num_workers=0 on one rank the order is the shard order (= the order written). A rank gets no
    batches when there are fewer shards than ranks: shard with a smaller --shard_max_count then.

    train (train=True): `epoch_len` batches per process (default: one pass worth, ceil(count /
    (batch_size * world_size))), rounded up to a multiple of max(1, num_workers). Shards are resampled
    with replacement, samples go through a `shuffle_buffer`, crops are random. The stream is a pure
    function of (files, seed, epoch, rank, num_workers, batch_size, shuffle_buffer): no global RNG is read
    or consumed. To resume at global step s with a fixed epoch_len, recreate the loader with
    `epoch, skip_batches = divmod(s, epoch_len)`; it yields exactly the batches the uninterrupted run
    would have yielded from there (see `resume_position`). Create one loader per epoch.
    """
    manifest = read_manifest(location)
    urls = shard_urls(location, manifest.shard_names.get(split, []))
    if not urls:
        raise ManifestError(f"{file_url(location, MANIFEST)} has no {split!r} samples (counts {manifest.counts}); "
                            f"raise --val_fraction or add files, then {MAKE_SHARDS_HINT}")
    spec, field_name, num_classes = manifest.spec, manifest.field_name, len(manifest.class_names)
    generator = torch.Generator().manual_seed(seed)  # DataLoader draws a base seed; keep it off the global RNG
    if not train:
        pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker,
                                    _tar_samples, partial(_eval_samples, spec=spec, field_name=field_name,
                                                          num_classes=num_classes),
                                    wds.batched(batch_size, collation_fn=_collate, partial=True))
        return DataLoader(pipeline, batch_size=None, num_workers=num_workers, generator=generator)
    _, world_size, _, _ = wds.utils.pytorch_worker_info()
    workers = max(1, num_workers)
    if epoch_len is None:
        epoch_len = -(-manifest.counts[split] // (batch_size * world_size))
    per_worker = -(-epoch_len // workers)
    if not 0 <= skip_batches < per_worker * workers:
        raise ValueError(f"skip_batches={skip_batches} outside the epoch of {per_worker * workers} batches")
    # webdataset's resampled=True + with_epoch(n) done by hand: the per-worker sample count depends on
    # the worker's share of skip_batches, which with_epoch (one n for all workers) cannot express.
    source = partial(_train_samples, urls, spec, field_name, num_classes, seed, epoch, shuffle_buffer, batch_size,
                     per_worker, skip_batches)
    pipeline = wds.DataPipeline(source, wds.batched(batch_size, collation_fn=_collate, partial=False))
    return DataLoader(pipeline, batch_size=None, num_workers=num_workers, generator=generator)


def resume_position(step: int, epoch_len: int, num_workers: int = 0) -> tuple[int, int]:
    """Global step -> (epoch, skip_batches) for `media_loader`, with epoch_len as rounded there."""
    workers = max(1, num_workers)
    return divmod(step, -(-epoch_len // workers) * workers)
