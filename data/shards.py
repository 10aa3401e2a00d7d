"""Media shards on disk: the atomic tar writer, the train/val split, `manifest.json` and the writer that
turns a `Source` into shards. The training/eval reader is data/reader.py (`media_loader`).

Layout of a shard directory (format "simvq-media-shards", version 1):
    {split}-{index:06d}.tar   split in {"train", "val"}, index from 0 per split
    manifest.json             written last: a directory without it is an interrupted run
Each sample in a tar: `{key}.png` (or `{key}.wav`, see data/media.py) and `{key}.cls` (ASCII int label,
index into the manifest's `class_names`, -1 when unlabelled). Every tar is written to a temp name and
renamed when complete (data/files.py), so a shard that exists is whole.

Sample order: the source's items shuffled by `random.Random(shuffle_seed)` (recorded in the manifest),
so every shard mixes classes; a folder source lists files sorted by path, i.e. grouped by class. The
shard bytes are a deterministic function of (source files, spec, split_seed, shuffle_seed, shard limits).

Split rule (stable when files are added, because it looks at one key only):
    val  iff  int(sha256(f"{split_seed}:{key}")[:16], 16) / 2**64 < val_fraction
An item with a `group` (the spoken built-ins: its voice) hashes the group instead of its key, so a whole
group lands in one split (speaker-disjoint val, as in SC09); `val_fraction` is then a share of groups.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import random
import re
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from data.builtin import Source
from data.errors import MediaError, UserError
from data.files import atomic_path, write_json_atomic
from data.media import MODALITIES, MediaSpec, normalise

MEDIA_FORMAT = "simvq-media-shards"
MEDIA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
MAKE_SHARDS_HINT = ("run `python -m pipelines.make_shards --source=digits|photos|spoken-digits|spoken-digit-strings|"
                    "/path/to/folder --out=DIR` first")


class ManifestError(UserError, RuntimeError):
    """A shard directory whose manifest is missing, of another format/version, or incompatible."""


# ------------------------------------------------------------------------------------ bytes on disk
def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def list_shards(directory: str | Path, split: str) -> list[Path]:
    """Complete shards of one split, sorted by index (temp files of an interrupted write are ignored)."""
    return sorted(Path(directory).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))


class AtomicTar:
    """A tar written through `atomic_path`: renamed to `path` on a clean exit, removed on an exception.
    Members get fixed metadata (mtime 0, root, 0444) so the same samples give the same bytes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.count = 0  # samples written
        self.bytes = 0  # payload bytes written
        self._files = contextlib.ExitStack()  # closes the tar, then renames (or removes) its temp file
        tmp = self._files.enter_context(atomic_path(self.path))
        self.tar = self._files.enter_context(tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT))

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
        self._files.__exit__(exc_type, exc, tb)


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


def assign_split(key: str, split_seed: int, val_fraction: float, group: str = "") -> str:
    """"train" | "val" by a hash of `group` when given (all of a group's items together), else of `key`."""
    digest = hashlib.sha256(f"{split_seed}:{group or key}".encode()).hexdigest()
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

    @property
    def dataset_name(self) -> str:
        """A short name for metric tags: "builtin:digits(size=16)" -> "digits", "folder:/data/My-Set" -> "my_set"."""
        kind, _, rest = self.source.partition(":")
        name = rest.split("(")[0] if kind == "builtin" else Path(rest).name
        return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_") or "data"

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
            split = assign_split(item.key, split_seed, val_fraction, item.group)
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
