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

Locations. Every reader takes a *location*: a local directory, an http(s) base URL (`https://host/d/shards`: a file
is base + "/" + name) or a `pipe:` command template with `{}` where the file name goes (`pipe:aws s3 cp
s3://bucket/d/shards/{} -`, `pipe:gsutil cat gs://bucket/d/shards/{}`; run by the shell, stdout is the file).
`manifest.json` is read through the same form (the file; urllib; the user's command), and it names the shards, so a
URL needs no directory listing; the shards are opened by webdataset's own URL handling (`shard_urls`). Nothing is
run unless the user wrote `pipe:`, and a name from a fetched manifest is substituted only when it is a plain file
name. Writers stay local.

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
import os
import random
import re
import subprocess
import tarfile
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import webdataset as wds

from data.builtin import Source
from data.errors import MediaError, UserError
from data.files import TEMP_MARK, atomic_path, write_json_atomic
from data.media import MODALITIES, MediaSpec, normalise

MEDIA_FORMAT = "simvq-media-shards"
MEDIA_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
MAKE_SHARDS_HINT = ("run `python -m pipelines.make_shards --source=digits|photos|spoken-digits|spoken-digit-strings|"
                    "/path/to/folder --out=DIR` first")
REMAKE_HINT = "re-create the shards (`python -m pipelines.make_shards ... --overwrite=true`)"


class ManifestError(UserError, RuntimeError):
    """A shard directory whose manifest is missing, of another format/version, or incompatible."""


def damaged(url: str, key: str | None, exc: Exception, hint: str = REMAKE_HINT) -> ManifestError:
    """The error for a shard that is not a readable tar (`key` None) or one of its samples that cannot be read (a
    member missing: KeyError; a .cls that is no integer, bytes that do not decode: ValueError / MediaError)."""
    what = f"{url} is not a readable tar file" if key is None else f"{url}: sample {key!r} is damaged"
    reason = f"no .{exc.args[0]} member" if isinstance(exc, KeyError) else str(exc) or type(exc).__name__
    return ManifestError(f"{what} ({reason}); {hint}")


# ------------------------------------------------------------------------------------ bytes on disk
def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def list_shards(directory: str | Path, split: str) -> list[Path]:
    """Complete shards of one split, sorted by index (temp files of an interrupted write are ignored)."""
    return sorted(Path(directory).glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))


def remove_temp_files(directory: Path, names: Iterable[str] = (MANIFEST,)) -> None:
    """Delete what a killed writer left in a local shard directory (SIGKILL skips atomic_path's cleanup): the hidden
    temp shards `.{split}-NNNNNN.tmp-PID.tar` and the temp copies of `names` (manifest.json, ...). No reader opens
    them (readers open the names in the manifest), but nothing else would ever remove them."""
    patterns = [f".{split}-[0-9][0-9][0-9][0-9][0-9][0-9]{TEMP_MARK}*.tar" for split in SPLITS]
    patterns += [f".{Path(name).stem}{TEMP_MARK}*{Path(name).suffix}" for name in names]
    for pattern in patterns:
        for path in directory.glob(pattern):
            path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ locations
REMOTE = ("http://", "https://", "pipe:")
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # what a manifest may name: no '/', no shell characters


def is_remote(location: str | Path) -> bool:
    """An http(s) base URL or a pipe: template (see the module docstring); anything else is a local directory."""
    return str(location).startswith(REMOTE)


def file_url(location: str | Path, name: str) -> str:
    """File `name` at `location` as webdataset opens it: an absolute path (so no local path is ever taken for a URL
    scheme), base URL + "/" + name, or the pipe: template with every {} replaced by the name."""
    if not PLAIN_NAME.fullmatch(name):
        raise ManifestError(f"{location}: the manifest names a shard {name!r}, which is not a plain file name "
                            "(letters, digits, '.', '_', '-'); it was not written by this project")
    location = str(location)
    if location.startswith("pipe:"):
        if "{}" not in location:
            raise UserError(f"{location!r}: a pipe: location needs {{}} where the file name goes, e.g. "
                            "'pipe:aws s3 cp s3://bucket/shards/{} -'")
        return location.replace("{}", name)
    if is_remote(location):
        return f"{location.rstrip('/')}/{name}"
    return os.path.abspath(os.path.join(location, name))


def shard_urls(location: str | Path, names: Iterable[str]) -> list[str]:
    return [file_url(location, name) for name in names]


def read_file(location: str | Path, name: str, timeout: float = 60) -> bytes:
    """The bytes of file `name` at `location`: the local file, an HTTP GET (urllib), or the stdout of the user's pipe:
    command. FileNotFoundError when a local file or URL does not exist (HTTP 404); UserError when the server cannot
    be reached or the command fails."""
    url = file_url(location, name)
    if url.startswith("pipe:"):
        done = subprocess.run(url.removeprefix("pipe:"), shell=True, capture_output=True)
        if done.returncode:
            err = done.stderr.decode(errors="replace").strip().splitlines()
            raise UserError(f"`{url.removeprefix('pipe:')}` exited with status {done.returncode}"
                            + (f" ({err[-1]})" if err else "") + ": fix the pipe: command (it must print the file "
                            "on stdout) or the location")
        return done.stdout
    if is_remote(url):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(url) from None
            raise UserError(f"cannot read {url}: HTTP {exc.code} {exc.reason}; check the URL") from None
        except OSError as exc:  # URLError: refused, unknown host, timeout
            raise UserError(f"cannot read {url}: {getattr(exc, 'reason', exc)}; check the URL and that the "
                            "server is up") from None
    if not os.path.isfile(url):
        raise FileNotFoundError(url)
    return Path(url).read_bytes()


def names_per_split(counts: dict[str, int], names: dict[str, list[str]]) -> dict[str, list[str]]:
    """A manifest's shard file names per split: `names` where given, else (manifests written before the names were)
    `{split}-{index:06d}.tar` for index < the split's shard count."""
    filled = {split: list(names[split]) if split in names else [shard_name(split, i) for i in range(counts[split])]
              for split in {**counts, **names}}
    wrong = [f"{split} names {len(v)} shards, counts {counts.get(split, 0)}" for split, v in filled.items()
             if len(v) != counts.get(split, 0)]
    if wrong:
        raise ManifestError(f"its shard names and counts disagree ({'; '.join(wrong)})")  # the readers say where
    return filled


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
        self.names: list[str] = []  # file names of the shards opened so far
        self.count = 0  # samples written so far

    def add(self, key: str, fields: dict[str, bytes]) -> None:
        full = self.current is not None and (self.current.count >= self.max_count or
                                             self.current.bytes >= self.max_bytes)
        if full:
            self.close()
        if self.current is None:
            self.names.append(shard_name(self.split, len(self.names)))
            self.current = AtomicTar(self.directory / self.names[-1])
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
    # The tar file names per split in index order, what every reader opens (a URL has no listing); manifests written
    # before this field get `{split}-{index:06d}.tar` from `shards`.
    shard_names: dict[str, list[str]] = field(default_factory=dict)
    format: str = MEDIA_FORMAT
    version: int = MEDIA_VERSION

    def __post_init__(self) -> None:
        self.shard_names = names_per_split(self.shards, self.shard_names)

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


def read_manifest(location: str | Path) -> MediaManifest:
    """The manifest at a local directory or URL (module docstring). For a local directory also check that the shards
    it names are exactly the ones there; a URL is trusted to serve what its manifest names."""
    where = file_url(location, MANIFEST)
    try:
        d = json.loads(read_file(location, MANIFEST))
    except FileNotFoundError:
        raise ManifestError(f"{where} not found: {location} is not a finished media shard directory; "
                            f"{MAKE_SHARDS_HINT}") from None
    except ValueError:  # not UTF-8 or not JSON: e.g. an HTML page served in its place
        raise ManifestError(f"{where} is not a JSON manifest: is {location} a media shard directory? "
                            f"{MAKE_SHARDS_HINT}") from None
    if not isinstance(d, dict) or d.get("format") != MEDIA_FORMAT or d.get("version") != MEDIA_VERSION:
        d = d if isinstance(d, dict) else {}
        raise ManifestError(f"{where} has format {d.get('format')!r} version {d.get('version')!r}; this code reads "
                            f"{MEDIA_FORMAT!r} version {MEDIA_VERSION}: re-create the shards ({MAKE_SHARDS_HINT})")
    try:
        manifest = MediaManifest.from_dict(d)
    except (KeyError, TypeError, ValueError, AttributeError, UserError) as e:  # missing/unknown fields, bad spec
        reason = f"no {e.args[0]!r} field" if isinstance(e, KeyError) else str(e)
        raise ManifestError(f"{where} is not a valid media manifest ({reason}); {REMAKE_HINT}") from None
    if not is_remote(location):
        for split in SPLITS:
            names, found = manifest.shard_names.get(split, []), len(list_shards(location, split))
            if found != len(names) or not all(os.path.isfile(file_url(location, n)) for n in names):
                raise ManifestError(f"{where} lists {len(names)} {split} shards but {found} exist in {location}; "
                                    f"the directory was modified: {MAKE_SHARDS_HINT}")
    return manifest


def count_samples(path: str | Path, hint: str = REMAKE_HINT) -> int:
    """Samples in a local shard: one `.cls` member each (tar headers only, the payloads are skipped)."""
    try:
        with tarfile.open(path, "r:") as tar:
            return sum(1 for m in tar if m.isfile() and m.name.endswith(".cls"))
    except (tarfile.TarError, EOFError) as exc:
        raise damaged(str(path), None, exc, hint) from None


def check_counts(location: str | Path, manifest: MediaManifest) -> None:
    """For a local directory: the samples in each split's shards are the manifest's counts (a truncated shard, a
    hand-edited manifest). Reads every tar header once (no payloads), so a stage calls it once, not per epoch."""
    if is_remote(location):
        return
    for split in SPLITS:
        found = sum(count_samples(file_url(location, name)) for name in manifest.shard_names.get(split, []))
        if found != manifest.counts.get(split, 0):
            raise ManifestError(f"{file_url(location, MANIFEST)} counts {manifest.counts.get(split, 0)} {split} "
                                f"samples but its shards hold {found}; {REMAKE_HINT}")


def manifest_sha256(location: str | Path) -> str:
    """sha256 of the manifest.json bytes at a local directory or URL (what token manifests and metrics record)."""
    return hashlib.sha256(read_file(location, MANIFEST)).hexdigest()


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
    from `class_names` (recorded in `dropped_classes`) and the other labels are renumbered to match.

    Interrupted (Ctrl-C, a bug, SIGKILL): there is no manifest.json until the very end, so no reader takes the
    directory for finished shards, and the same command run again needs no --overwrite (there is no manifest). It
    writes every shard from the start (each replaced atomically), deletes the temp files a killed run left and every
    shard it does not produce itself, so it ends with exactly the shards of an uninterrupted run."""
    out = Path(out_dir)
    if (out / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{out / MANIFEST} exists: {out} already holds shards; pass --overwrite=true "
                              "to replace them or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on, a crash leaves no valid manifest behind
    remove_temp_files(out)  # a SIGKILLed earlier run's half-written shards or manifest
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
        for split, sink in sinks.items():  # left over from an earlier (killed, or larger) run: not this run's data
            for stale in list_shards(out, split):
                if stale.name not in sink.names:
                    stale.unlink()
        kept = [i for i, _ in enumerate(source.class_names) if written[i]]
        dropped = [name for i, name in enumerate(source.class_names) if not written[i]]
        if dropped:  # an empty class would still take a label index (and a prior class embedding) for nothing
            log(f"make_shards: dropping {len(dropped)} class(es) with no readable file: {', '.join(dropped)}")
            _relabel(out, {old: new for new, old in enumerate(kept)})
    except BaseException as exc:  # Ctrl-C or a bug: no temp files, no manifest; the same command reruns it
        for sink in sinks.values():
            sink.close(error=exc)
        raise
    manifest = MediaManifest(source.name, spec, [source.class_names[i] for i in kept],
                             counts={s: sinks[s].count for s in SPLITS},
                             shards={s: len(sinks[s].names) for s in SPLITS},
                             split_seed=split_seed, val_fraction=val_fraction, shuffle_seed=shuffle_seed,
                             skipped=sorted(skipped, key=lambda s: s["origin"]), dropped_classes=dropped,
                             shard_names={s: sinks[s].names for s in SPLITS})
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


def iter_shard_samples(path: str | Path, hint: str = REMAKE_HINT) -> Iterable[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of one tar, in file order; the reader of every stage. `path` is a local
    file or a URL from `shard_urls` (streamed through webdataset's `gopen`: curl for http(s), the shell for pipe:).
    The key/extension split is webdataset's: extension = everything after the first '.' of the basename.
    A damaged tar (truncated, garbage, empty) is a ManifestError naming it, with `hint` as the fix."""
    key, fields = None, {}
    try:
        with _open_tar(path) as tar:
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
    except (tarfile.TarError, EOFError) as exc:  # a local file (_open_tar reports a URL's errors itself)
        raise damaged(str(path), None, exc, hint) from None
    if key is not None:
        yield key, fields


@contextlib.contextmanager
def _open_tar(path: str | Path) -> Iterator[tarfile.TarFile]:
    if not is_remote(path):
        with tarfile.open(path, "r:") as tar:  # the shards are plain tars
            yield tar
        return
    stream = wds.gopen(str(path), "rb")
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:  # a stream: members are read in order
            yield tar
        while stream.read(1 << 20):  # the end-of-archive padding, so the writer exits before the pipe closes
            pass
        stream.close()  # waits for curl / the user's command; raises when it failed
    except (OSError, tarfile.TarError) as exc:  # webdataset's Pipe reports the exit status as an OSError
        raise UserError(f"cannot read {path}: {exc}; check the location (--data / --tokens)") from None
    finally:
        with contextlib.suppress(OSError):  # after an error or an early stop: already reported, or not an error
            stream.close()
