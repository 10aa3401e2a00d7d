"""Media shards on disk: the atomic tar writer, the train/val split, `manifest.json`, the writer that
turns a `Source` into shards, and `media_loader`, the webdataset reader (see its docstring for the
determinism / resume contract).

Layout of a shard directory (format "simvq-media-shards", version 1):
    {split}-{index:06d}.tar   split in {"train", "val"}, index from 0 per split
    manifest.json             written last: a directory without it is an interrupted run
Each sample in a tar: `{key}.png` (or `{key}.wav`, see data/media.py) and `{key}.cls` (ASCII int label,
index into the manifest's `class_names`, -1 when unlabelled). Every tar is written to `{name}.tmp` and
renamed when complete, so a shard that exists is whole.

Sample order: the source's items shuffled by `random.Random(shuffle_seed)` (recorded in the manifest),
so every shard mixes classes; a folder source lists files sorted by path, i.e. grouped by class. The
shard bytes are a deterministic function of (source files, spec, split_seed, shuffle_seed, shard limits).

Split rule (stable when files are added, because it looks at one key only):
    val  iff  int(sha256(f"{split_seed}:{key}")[:16], 16) / 2**64 < val_fraction
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import json
import os
import random
import tarfile
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import torch
import webdataset as wds
from torch.utils.data import DataLoader

from data.builtin import Source
from data.errors import UserError
from data.media import MODALITIES, MediaError, MediaSpec, decode, normalise

MEDIA_FORMAT = "simvq-media-shards"
MEDIA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
MAKE_SHARDS_HINT = "run `python -m pipelines.make_shards --source=digits|photos|/path/to/folder --out=DIR` first"


class ManifestError(UserError, RuntimeError):
    """A shard directory whose manifest is missing, of another format/version, or incompatible."""


# ------------------------------------------------------------------------------------ bytes on disk
def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def list_shards(directory: str | Path, split: str) -> list[Path]:
    """Complete shards of one split, sorted by index (temp files of an interrupted write are ignored)."""
    return sorted(Path(directory).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to a per-process temp name, then rename: a reader sees the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


class AtomicTar:
    """A tar written to `path.tmp` and renamed to `path` on a clean exit (removed on an exception).
    Members get fixed metadata (mtime 0, root, 0444) so the same samples give the same bytes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.count = 0  # samples written
        self.bytes = 0  # payload bytes written
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.PAX_FORMAT)

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        if "." in key.rsplit("/", 1)[-1] or key.startswith("/") or not key:
            raise ValueError(f"shard key {key!r} must be non-empty, relative, with no '.' in its last part")
        for ext, payload in sorted(fields.items()):  # a sample's members must be adjacent in the tar
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o444
            self.tar.addfile(info, io.BytesIO(payload))
            self.bytes += len(payload)
        self.count += 1

    def __enter__(self) -> "AtomicTar":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.tar.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


class ShardSink:
    """Rolls samples of one split over `{split}-{index:06d}.tar` files, max_count samples or
    max_bytes payload each (the webdataset.ShardWriter behaviour, plus the atomic rename)."""

    def __init__(self, directory: Path, split: str, max_count: int, max_bytes: int):
        self.directory, self.split, self.max_count, self.max_bytes = directory, split, max_count, max_bytes
        self.current: AtomicTar | None = None
        self.shards = 0  # shards opened so far
        self.count = 0  # samples written so far

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        full = self.current is not None and (self.current.count >= self.max_count or
                                             self.current.bytes >= self.max_bytes)
        if full:
            self.close()
        if self.current is None:
            self.current = AtomicTar(self.directory / shard_name(self.split, self.shards))
            self.shards += 1
        self.current.add(key, fields)
        self.count += 1

    def close(self, error: BaseException | None = None) -> None:
        """Finish the open shard (rename into place), or on `error` delete its temp file."""
        if self.current is not None:
            self.current.__exit__(type(error) if error else None, error, None)
            self.current = None


def assign_split(key: str, split_seed: int, val_fraction: float) -> str:
    digest = hashlib.sha256(f"{split_seed}:{key}".encode()).hexdigest()
    return "val" if int(digest[:16], 16) / 2**64 < val_fraction else "train"


# ------------------------------------------------------------------------------------------ manifest
@dataclass
class MediaManifest:
    """What `manifest.json` of a media shard directory says. `spec` fixes decoding for every reader."""

    source: str  # where the samples came from (builtin:... or folder:/abs/path)
    spec: MediaSpec  # modality and resolution policy used at shard time (and default at read time)
    class_names: list[str]  # label i is class_names[i]; empty when unlabelled (labels are then -1)
    counts: dict[str, int]  # samples per split
    shards: dict[str, int]  # number of tar files per split
    split_seed: int  # see the split rule in the module docstring
    val_fraction: float
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"origin", "reason"} per skipped file
    shuffle_seed: int | None = None  # order the samples were written in; None: source order (older writer)
    dropped_classes: list[str] = field(default_factory=list)  # source classes with no readable file
    format: str = MEDIA_FORMAT
    version: int = MEDIA_VERSION

    @property
    def field_name(self) -> str:
        return MODALITIES[self.spec.modality].field

    def to_dict(self) -> dict:
        return asdict(self) | {"field": self.field_name, "num_skipped": len(self.skipped)}

    @classmethod
    def from_dict(cls, d: dict) -> "MediaManifest":
        d = {k: v for k, v in d.items() if k not in ("field", "num_skipped")}  # derived, written for humans
        return cls(**{**d, "spec": MediaSpec(**d["spec"])})


def read_manifest(directory: str | Path) -> MediaManifest:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path} not found: {directory} is not a finished media shard directory; "
                            f"{MAKE_SHARDS_HINT}")
    d = json.loads(path.read_text())
    if d.get("format") != MEDIA_FORMAT or d.get("version") != MEDIA_VERSION:
        raise ManifestError(f"{path} has format {d.get('format')!r} version {d.get('version')!r}; this code reads "
                            f"{MEDIA_FORMAT!r} version {MEDIA_VERSION}: re-create the shards ({MAKE_SHARDS_HINT})")
    manifest = MediaManifest.from_dict(d)
    for split in SPLITS:
        found = len(list_shards(directory, split))
        if found != manifest.shards.get(split, 0):
            raise ManifestError(f"{path} lists {manifest.shards.get(split, 0)} {split} shards but {found} exist "
                                f"in {directory}; the directory was modified: {MAKE_SHARDS_HINT}")
    return manifest


# ---------------------------------------------------------------------------------------- the writer
def write_media_shards(source: Source, out_dir: str | Path, spec: MediaSpec, *, val_fraction: float = 0.1,
                       split_seed: int = 0, shuffle_seed: int = 0, max_count: int = 1_000,
                       max_bytes: int = 256 << 20, overwrite: bool = False,
                       log: Callable[[str], None] = print) -> MediaManifest:
    """Normalise every item of `source` and write it to its split's shards, then `manifest.json`.

    Items are written in a `shuffle_seed`-shuffled order, not the source's (sorted, so class-grouped)
    order: the train reader only resamples shards and mixes within its buffer, so class-ordered shards
    would give batches of one or two classes. Items that fail to read or decode are skipped, logged
    with their origin and listed in the manifest. A class none of whose items was written is dropped
    from `class_names` (recorded in `dropped_classes`) and the other labels are renumbered to match."""
    out = Path(out_dir)
    if (out / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out / MANIFEST} exists: {out} already holds shards; pass --overwrite=true "
                              "to replace them or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on, a crash leaves no valid manifest behind
    sinks = {s: ShardSink(out, s, max_count, max_bytes) for s in SPLITS}
    skipped: list[dict[str, str]] = []

    def skip(origin: str, reason: str) -> None:
        log(f"make_shards: skipping {origin}: {reason}")
        skipped.append({"origin": origin, "reason": reason})

    # Duplicates are resolved in source order (the first one wins), so the seed never decides which file is kept.
    items, seen = [], set()
    for item in source.items:
        if item.key in seen:
            skip(item.origin, f"duplicate key {item.key!r} (names that differ only in '.' vs '_')")
        else:
            seen.add(item.key)
            items.append(item)
    random.Random(shuffle_seed).shuffle(items)
    field_name = MODALITIES[spec.modality].field
    written = collections.Counter()  # label -> samples written
    try:
        for item in items:
            try:
                raw = item.read()
                payload = raw if source.canonical else normalise(raw, spec)
            except (MediaError, OSError) as exc:  # a bad file costs one sample, never the whole run
                skip(item.origin, str(exc))
                continue
            split = assign_split(item.key, split_seed, val_fraction)
            sinks[split].add(item.key, {field_name: payload, "cls": str(item.label).encode()})
            written[item.label] += 1
        for sink in sinks.values():
            sink.close()
        if not written:
            raise MediaError(f"no readable samples in {source.name}: all {len(skipped)} were skipped (see log)")
        for split, sink in sinks.items():  # shards left over from an earlier, larger run would be read as data
            for stale in list_shards(out, split)[sink.shards:]:
                stale.unlink()
        kept = [i for i, _ in enumerate(source.class_names) if written[i]]
        dropped = [name for i, name in enumerate(source.class_names) if not written[i]]
        if dropped:  # an empty class would still take a label index (and a prior class embedding) for nothing
            log(f"make_shards: dropping {len(dropped)} class(es) with no readable file: {', '.join(dropped)}")
            _relabel(out, {old: new for new, old in enumerate(kept)})
    except BaseException as exc:  # Ctrl-C or a bug: no temp files, no manifest; rerun with --overwrite=true
        for sink in sinks.values():
            sink.close(error=exc)
        raise
    manifest = MediaManifest(source.name, spec, [source.class_names[i] for i in kept],
                             counts={s: sinks[s].count for s in SPLITS}, shards={s: sinks[s].shards for s in SPLITS},
                             split_seed=split_seed, val_fraction=val_fraction, shuffle_seed=shuffle_seed,
                             skipped=sorted(skipped, key=lambda s: s["origin"]), dropped_classes=dropped)
    write_json_atomic(out / MANIFEST, manifest.to_dict())
    return manifest


def _relabel(out: Path, new_label: dict[int, int]) -> None:
    """Rewrite every shard's `.cls` through `new_label` (unlabelled -1 stays). Rare (a class lost all its
    files), so the shards are rewritten rather than labels being guessed before decoding everything;
    each tar is replaced atomically and keeps its samples, order and boundaries."""
    for split in SPLITS:
        for path in list_shards(out, split):
            samples = list(iter_shard_samples(path))  # one shard: at most max_bytes of payload
            with AtomicTar(path) as tar:
                for key, fields in samples:
                    label = int(fields["cls"])
                    tar.add(key, fields | {"cls": str(new_label.get(label, label)).encode()})


def iter_shard_samples(path: str | Path) -> Iterable[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of one tar, in file order; a plain reader for tools and tests.
    The key/extension split is webdataset's: extension = everything after the first '.' of the basename."""
    key, fields = None, {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            sample_key = f"{folder}/{stem}" if folder else stem
            if key is not None and sample_key != key:
                yield key, fields
                fields = {}
            key = sample_key
            fields[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, fields


# ---------------------------------------------------------------------------------------- the reader
class MediaBatch(NamedTuple):
    x: torch.Tensor  # (B, 3, H, W) images or (B, 1, T) audio, float32 in [-1, 1]
    labels: torch.Tensor  # (B,) int64, -1 = unlabelled
    keys: list[str]  # the samples' shard keys (relative source path with '.' -> '_')


def _collate(samples: list[tuple[torch.Tensor, int, str]]) -> MediaBatch:
    xs, labels, keys = zip(*samples)
    return MediaBatch(torch.stack(xs), torch.tensor(labels, dtype=torch.long), list(keys))


def _decode(sample: dict, spec: MediaSpec, field_name: str, rng: random.Random | None):
    return decode(sample[field_name], spec, rng), int(sample["cls"]), sample["__key__"]


def _train_samples(urls: list[str], spec: MediaSpec, field_name: str, seed: int, epoch: int, buffer: int,
                   batch_size: int, per_worker: int, skip_batches: int):
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
    samples = wds.tarfile_to_samples()(shards)
    samples = wds.shuffle(buffer, initial=buffer, rng=random.Random(f"shuffle/{tag}"))(samples)
    # Raw samples of skipped batches are drawn (to advance the shuffle) but not decoded; each crop has
    # its own seed from its position, so skipping costs no decode and changes no later crop.
    for index, sample in enumerate(itertools.islice(samples, per_worker * batch_size)):
        if index >= first * batch_size:
            yield _decode(sample, spec, field_name, random.Random(f"crop/{tag}/{index}"))


def _eval_samples(src, spec: MediaSpec, field_name: str):
    for sample in src:
        yield _decode(sample, spec, field_name, None)


def media_loader(shard_dir: str | Path, split: str, batch_size: int, train: bool, seed: int = 0, epoch: int = 0,
                 epoch_len: int | None = None, num_workers: int = 0, skip_batches: int = 0,
                 shuffle_buffer: int = 1_000) -> DataLoader:
    """A DataLoader of `MediaBatch(x, labels, keys)` over the `split` shards of `shard_dir`.

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
    manifest = read_manifest(shard_dir)
    urls = [str(p) for p in list_shards(shard_dir, split)]
    if not urls:
        raise ManifestError(f"{Path(shard_dir) / MANIFEST} has no {split!r} samples (counts {manifest.counts}); "
                            f"raise --val_fraction or add files, then {MAKE_SHARDS_HINT}")
    spec, field_name = manifest.spec, manifest.field_name
    generator = torch.Generator().manual_seed(seed)  # DataLoader draws a base seed; keep it off the global RNG
    if not train:
        pipeline = wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker,
                                    wds.tarfile_to_samples(), partial(_eval_samples, spec=spec, field_name=field_name),
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
    source = partial(_train_samples, urls, spec, field_name, seed, epoch, shuffle_buffer, batch_size, per_worker,
                     skip_batches)
    pipeline = wds.DataPipeline(source, wds.batched(batch_size, collation_fn=_collate, partial=False))
    return DataLoader(pipeline, batch_size=None, num_workers=num_workers, generator=generator)


def resume_position(step: int, epoch_len: int, num_workers: int = 0) -> tuple[int, int]:
    """Global step -> (epoch, skip_batches) for `media_loader`, with epoch_len as rounded there."""
    workers = max(1, num_workers)
    return divmod(step, -(-epoch_len // workers) * workers)
