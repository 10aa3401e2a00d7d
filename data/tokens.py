"""Token shards: the tokenizer's codes for every media sample, the input of the prior.

Layout of a token directory (format "simvq-token-shards", version 1): one `{split}-{index:06d}.tar` per
media shard, same split and index (so an interrupted encode redoes only `pending_token_shards`), and
`manifest.json` (`TokenManifest`), written last.

Per sample, in a tar written atomically (temp name + rename):
    {key}.codes  the code grid flattened in raster order (row-major / C order over the grid: for an
                 image grid (h, w), position i is row i // w, column i % w), as raw little-endian bytes
                 of `code_dtype(K)`: uint8 for K <= 256, uint16 for K <= 65,536, else int32. (int16
                 would stop at 32,767; uint32 buys nothing below 2**31 codes and numpy/torch handle
                 int32 better.) Length = prod(grid) * itemsize, checked on read.
    {key}.cls    ASCII int class label, -1 when unlabelled
The key is the media sample's key, so every token row traces back to its source file.

Reading. The directory may be a URL (an http(s) base URL or a `pipe:` template, data/shards.py): the manifest names
the shards. `load_tokens` holds a split in memory with its keys (tools, tests); training reads `open_tokens`, which
converts a split once into contiguous `.npy` arrays (a cache next to the tokens, or under a cache directory for a
URL) and memory-maps them, so the processes on one machine share one copy of the codes in the page cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch

from data.errors import UserError
from data.files import atomic_path, write_json_atomic
from data.media import MediaSpec
from data.shards import (MANIFEST, SPLITS, AtomicTar, ManifestError, damaged, file_url, is_remote, iter_shard_samples,
                         list_shards, names_per_split, read_file, shard_urls)

TOKEN_FORMAT = "simvq-token-shards"
TOKEN_VERSION = 1
ENCODE_HINT = "run `python -m pipelines.encode_shards` to (re-)encode the media shards with this tokenizer"
TOKEN_CACHE = "runs/token_cache"  # open_tokens' cache for tokens read from a URL, unless given another directory


def code_dtype(num_codes: int) -> np.dtype:
    """Smallest little-endian dtype holding codes 0..num_codes-1 (see module docstring)."""
    if num_codes < 1 or num_codes > 2**31:
        raise ValueError(f"num_codes={num_codes} must be in [1, 2**31]")
    if num_codes <= 2**8:
        return np.dtype("<u1")
    return np.dtype("<u2") if num_codes <= 2**16 else np.dtype("<i4")


class TokenSample(NamedTuple):
    key: str  # the media sample's key
    codes: np.ndarray | torch.Tensor  # integer grid, e.g. (h, w); flattened in raster order on write
    label: int  # class index, -1 when unlabelled


def write_token_shard(path: str | Path, samples: Iterable[TokenSample], num_codes: int,
                      grid: tuple[int, ...] | None = None) -> int:
    """Write one token shard atomically; returns the number of samples. Every sample must have shape
    `grid` (default: the first sample's) and codes in [0, num_codes)."""
    dtype = code_dtype(num_codes)
    with AtomicTar(path) as tar:
        for sample in samples:
            codes = sample.codes.cpu().numpy() if isinstance(sample.codes, torch.Tensor) else np.asarray(sample.codes)
            grid = tuple(codes.shape) if grid is None else tuple(grid)
            if tuple(codes.shape) != grid:
                raise ValueError(f"{path}: sample {sample.key!r} has code shape {codes.shape}, expected {grid}")
            if codes.size and (codes.min() < 0 or codes.max() >= num_codes):
                raise ValueError(f"{path}: sample {sample.key!r} has codes in [{codes.min()}, {codes.max()}], "
                                 f"outside [0, {num_codes})")
            raw = np.ascontiguousarray(codes.reshape(-1), dtype=dtype).tobytes()  # (prod(grid),) raster order
            tar.add(sample.key, {"codes": raw, "cls": str(int(sample.label)).encode()})
        return tar.count


@dataclass
class TokenManifest:
    """`manifest.json` of a token directory: what produced the codes and how to read them."""

    tokenizer_sha256: str  # sha256 of the tokenizer checkpoint's model.safetensors
    quantizer: str  # quantizer name, e.g. "simvq"
    num_codes: int  # K
    grid: list[int]  # code grid per sample, e.g. [16, 16]; sequence length = prod(grid)
    counts: dict[str, int]  # samples per split
    class_names: list[str]  # from the media manifest; empty when unlabelled
    source_manifest_sha256: str  # sha256 of the media shards' manifest.json
    shards: dict[str, int] = field(default_factory=dict)  # tar files per split (= media shards per split)
    dtype: str = ""  # numpy dtype name of the stored codes; filled from num_codes
    # Codes the project did not encode (pipelines.pack_tokens): where they came from ({"command", "codes", "labels",
    # "sha256", "tokenizer"}); empty for encode_shards output, whose source is the media manifest above.
    source: dict = field(default_factory=dict)
    # The timing of what one token stands for, so a user of the tokens needs no media manifest: for audio
    # {"modality": "audio", "sample_rate": Hz, "hop": samples per token, "tokens_per_second", "clip_seconds"}; for
    # images {"modality": "image", "size": px, "downsample_factor": px per token per axis}. Filled by encode_shards;
    # empty in manifests written before it existed and in pack_tokens output (the codes' media are not known there).
    media: dict = field(default_factory=dict)
    # The tar file names per split in index order, what the readers open (a URL has no listing); manifests written
    # before this field get `{split}-{index:06d}.tar` from `shards` (a manifest without `shards` has none).
    shard_names: dict[str, list[str]] = field(default_factory=dict)
    format: str = TOKEN_FORMAT
    version: int = TOKEN_VERSION

    def __post_init__(self) -> None:
        self.shard_names = names_per_split(self.shards, self.shard_names)
        expected = code_dtype(self.num_codes).name
        if self.dtype and self.dtype != expected:
            raise ManifestError(f"it says dtype {self.dtype} but K={self.num_codes} is stored as {expected}")
        self.dtype = expected
        self.grid = [int(g) for g in self.grid]

    @property
    def seq_len(self) -> int:
        return math.prod(self.grid)

    def save(self, directory: str | Path) -> None:
        write_json_atomic(Path(directory) / MANIFEST, asdict(self))

    @classmethod
    def load(cls, location: str | Path) -> "TokenManifest":
        """The manifest of a local token directory or URL (data/shards.py)."""
        return _load_manifest(location)[0]

    def check_compatible(self, **expected) -> None:
        """Raise ManifestError listing every field that differs from `expected` (any manifest field by
        name, e.g. num_codes=K, grid=[16, 16], tokenizer_sha256=..., class_names=[...])."""
        mine = asdict(self)
        unknown = sorted(set(expected) - set(mine))
        if unknown:
            raise TypeError(f"check_compatible got unknown fields {unknown}; valid: {sorted(mine)}")
        normalise = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  grid may come as a tuple
        diffs = [f"{k}: token shards have {mine[k]!r}, expected {normalise(v)!r}"
                 for k, v in expected.items() if mine[k] != normalise(v)]
        if diffs:
            raise ManifestError("token shards do not match: " + "; ".join(diffs) + f". {ENCODE_HINT} "
                                "(or point to the token directory made by this tokenizer)")


def _load_manifest(location: str | Path) -> tuple[TokenManifest, str]:
    """(manifest, sha256 of its bytes) at a local directory or URL."""
    where = file_url(location, MANIFEST)
    try:
        raw = read_file(location, MANIFEST)
        d = json.loads(raw)
    except FileNotFoundError:
        raise ManifestError(f"{where} not found: {location} holds no finished token shards; {ENCODE_HINT}") from None
    except ValueError:  # not UTF-8 or not JSON: e.g. an HTML page served in its place
        raise ManifestError(f"{where} is not a JSON manifest: is {location} a token directory? {ENCODE_HINT}") from None
    if not isinstance(d, dict) or d.get("format") != TOKEN_FORMAT or d.get("version") != TOKEN_VERSION:
        d = d if isinstance(d, dict) else {}
        raise ManifestError(f"{where} has format {d.get('format')!r} version {d.get('version')!r}, expected "
                            f"{TOKEN_FORMAT!r} version {TOKEN_VERSION}; {ENCODE_HINT}")
    try:
        manifest = TokenManifest(**d)
    except (TypeError, ValueError, UserError) as e:  # missing/unknown fields, a grid of the wrong type, bad counts
        raise ManifestError(f"{where} is not a valid token manifest ({e}); {ENCODE_HINT}") from None
    return manifest, hashlib.sha256(raw).hexdigest()


def media_timing(spec: MediaSpec, downsample_factor: int) -> dict:
    """`TokenManifest.media` for media of `spec` encoded by a tokenizer with this downsample factor (the hop, for
    audio): what a token stands for, in the media's own units (16 kHz at hop 320: 50 tokens per second)."""
    if spec.modality == "audio":
        return {"modality": "audio", "sample_rate": spec.sample_rate, "hop": downsample_factor,
                "tokens_per_second": spec.sample_rate / downsample_factor, "clip_seconds": spec.clip_seconds}
    return {"modality": spec.modality, "size": spec.size, "downsample_factor": downsample_factor}


class PendingShard(NamedTuple):
    split: str
    index: int
    media_url: str  # the input media shard: an absolute local path or a URL (data.shards.shard_urls)
    token_path: Path  # where its token shard goes


def pending_token_shards(media: str | Path, token_dir: str | Path,
                         names: dict[str, list[str]] | None = None) -> list[PendingShard]:
    """Media shards whose token shard (the same file name in `token_dir`) does not exist yet; a token shard that
    exists is complete, because it was renamed into place only after being fully written. `names`: the media
    manifest's shard names per split (`MediaManifest.shard_names`, what a URL needs); None lists a local directory."""
    pending = []
    for split in SPLITS:
        split_names = [p.name for p in list_shards(media, split)] if names is None else names.get(split, [])
        for index, name in enumerate(split_names):
            token_path = Path(token_dir) / name
            if not token_path.exists():
                pending.append(PendingShard(split, index, file_url(media, name), token_path))
    return pending


# ---------------------------------------------------------------------------------------- the reader
class TokenSet(NamedTuple):
    codes: np.ndarray  # (N, L) in the stored dtype, L = prod(grid), raster order; memory-mapped from open_tokens
    labels: np.ndarray  # (N,) int64
    keys: list[str] | None  # the samples' keys (load_tokens); None from open_tokens, which keeps only the arrays


class TokenBatch(NamedTuple):
    tokens: torch.Tensor  # (B, L) int64
    labels: torch.Tensor  # (B,) int64


def token_shard_urls(location: str | Path, manifest: TokenManifest, split: str) -> list[str]:
    """The split's shards as the manifest names them; for a local directory also checks that they are all there."""
    names = manifest.shard_names.get(split)
    if names is None:  # a manifest without shard counts (older writers), or a split that was not encoded
        if not is_remote(location):
            return shard_urls(location, [p.name for p in list_shards(location, split)])
        if manifest.counts.get(split, 0):
            raise ManifestError(f"{file_url(location, MANIFEST)} names no {split} shards (written before shard "
                                f"names were recorded): read it from a local directory, or {ENCODE_HINT}")
        return []
    if not is_remote(location):
        found = len(list_shards(location, split))
        if found != len(names) or not all(os.path.isfile(file_url(location, n)) for n in names):
            raise ManifestError(f"{file_url(location, MANIFEST)} lists {len(names)} {split} shards but {found} "
                                f"exist; the encode did not finish: {ENCODE_HINT}")
    return shard_urls(location, names)


def _shard_rows(urls: list[str], manifest: TokenManifest) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """(keys, codes (n, L) in the stored dtype, labels (n,) int64) per shard, in order. A damaged tar or sample (no
    .codes or .cls, a .cls that is no integer, codes of another length) and codes outside [0, K) are a ManifestError
    naming the shard."""
    dtype, length, num_codes = np.dtype(manifest.dtype).newbyteorder("<"), manifest.seq_len, manifest.num_codes
    for url in urls:
        keys, raw, labels = [], [], []
        for key, fields in iter_shard_samples(url, ENCODE_HINT):
            try:
                codes, label = fields["codes"], int(fields["cls"])
            except (KeyError, ValueError) as exc:
                raise damaged(url, key, exc, ENCODE_HINT) from None
            if len(codes) != length * dtype.itemsize:
                raise ManifestError(f"{url}: sample {key!r} has {len(codes)} code bytes, expected {length} x "
                                    f"{dtype.itemsize} (grid {manifest.grid}); {ENCODE_HINT}")
            keys.append(key)
            raw.append(codes)
            labels.append(label)
        codes = np.frombuffer(b"".join(raw), dtype=dtype).reshape(len(keys), length)
        # one vectorised check per shard: codes >= K would train silently (or crash inside the prior's embedding)
        if codes.size and (codes.max() >= num_codes or (dtype.kind == "i" and codes.min() < 0)):
            outside = (codes >= num_codes) | (codes < 0)
            row = int(outside.any(1).argmax())
            raise ManifestError(f"{url}: sample {keys[row]!r} has code {int(codes[row][outside[row]][0])}, outside "
                                f"[0, {num_codes}) of the manifest's num_codes; {ENCODE_HINT}")
        yield keys, codes, np.asarray(labels, dtype=np.int64)


def _check_count(location: str | Path, split: str, found: int, expected: int) -> None:
    if found != expected:
        raise ManifestError(f"{location}: {found} {split} samples in the shards, the manifest says {expected}; "
                            f"{ENCODE_HINT}")


def load_tokens(location: str | Path, split: str) -> TokenSet:
    """All samples of one split in memory, keys included (tools and tests; training maps `open_tokens` instead:
    ImageNet at 16x16 would be ~650 MB of codes plus its keys in every process)."""
    manifest = TokenManifest.load(location)
    keys, rows, labels = [], [], []
    for shard_keys, codes, shard_labels in _shard_rows(token_shard_urls(location, manifest, split), manifest):
        keys += shard_keys
        rows.append(codes)
        labels.append(shard_labels)
    _check_count(location, split, len(keys), manifest.counts.get(split, len(keys)))
    dtype = np.dtype(manifest.dtype).newbyteorder("<")
    codes = np.concatenate(rows) if rows else np.zeros((0, manifest.seq_len), dtype)  # (N, L)
    return TokenSet(codes, np.concatenate(labels) if labels else np.zeros(0, np.int64), keys)


def open_tokens(location: str | Path, split: str, cache_dir: str | Path = "") -> TokenSet:
    """One split as read-only memory-mapped arrays: `TokenSet(codes (N, L) in the stored dtype, labels (N,) int64,
    keys=None)`, the same rows in the same order as `load_tokens`.

    On first use the shards are converted, one sample at a time, into `codes.npy` and `labels.npy` in
    `<cache>/<split>-<hash>/`, a directory renamed into place only when complete (data/files.py);
    later calls, and every other process on the machine, map those files, so N processes share one copy in the page
    cache instead of holding N (ImageNet at 16x16, K <= 65,536: 1,281,167 x 256 x 2 B = 656 MB per machine, not per
    process). The entry is named by a hash of the manifest and, for a local directory, of its shards' sizes, mtimes
    and inodes, so re-encoded tokens never meet a stale cache (a URL's shards are taken to change with its manifest).
    <cache> = `cache_dir`; else `<location>/cache` for a local directory (where older entries of the split are
    deleted); else runs/token_cache for a URL. Processes started together should let one of them build it first
    (accelerate's `local_main_process_first`); if several do, each writes its own temp copy and an identical one
    wins."""
    manifest, sha = _load_manifest(location)
    urls = token_shard_urls(location, manifest, split)
    key = hashlib.sha256(sha.encode())
    for url in [] if is_remote(location) else urls:
        stat = os.stat(url)
        key.update(f"{os.path.basename(url)}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}".encode())
    own = not cache_dir and not is_remote(location)  # the token directory's own cache
    root = Path(location) / "cache" if own else Path(cache_dir or TOKEN_CACHE)
    entry = root / f"{split}-{key.hexdigest()[:16]}"
    if not entry.is_dir():
        try:
            _build_cache(entry, urls, manifest, split, location)
        except OSError as exc:  # a read-only token directory, a full disk
            raise UserError(f"cannot write the token cache {entry}: {exc}; pass a writable --token_cache=DIR") from None
        for old in root.glob(f"{split}-*") if own else []:  # made from an earlier manifest of this directory
            if old != entry:  # (a process still mapping it keeps reading its files until it closes them)
                shutil.rmtree(old, ignore_errors=True)
    codes = np.load(entry / "codes.npy", mmap_mode="r", allow_pickle=False)
    labels = np.load(entry / "labels.npy", mmap_mode="r", allow_pickle=False)
    if codes.shape != (manifest.counts.get(split, 0), manifest.seq_len) or labels.shape != codes.shape[:1]:
        raise ManifestError(f"{entry} holds codes {codes.shape}, labels {labels.shape}, not the {split} split of "
                            f"{location}: delete {entry} and rerun")
    return TokenSet(codes, labels, None)


def _build_cache(entry: Path, urls: list[str], manifest: TokenManifest, split: str, location: str | Path) -> None:
    """Stream a split's shards into `entry`/codes.npy (N, L) and labels.npy (N,), written in place through a memory
    map (no copy of the split in memory) in a temp directory that is renamed to `entry` at the end."""
    n = manifest.counts.get(split, 0)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(entry) as tmp:
        tmp.mkdir()
        dtype = np.dtype(manifest.dtype).newbyteorder("<")
        codes = np.lib.format.open_memmap(tmp / "codes.npy", "w+", dtype, (n, manifest.seq_len))
        labels = np.lib.format.open_memmap(tmp / "labels.npy", "w+", np.dtype("<i8"), (n,))
        found = 0
        for _, rows, shard_labels in _shard_rows(urls, manifest):
            end = min(n, found + len(rows))
            if found < end:
                codes[found:end], labels[found:end] = rows[: end - found], shard_labels[: end - found]
            found += len(rows)
        _check_count(location, split, found, n)
        codes.flush()
        labels.flush()
        del codes, labels  # unmapped before the rename


class TokenLoader:
    """Batches of `TokenBatch(tokens (B, L) int64, labels (B,))` from a `TokenSet` (in memory or memory-mapped:
    only the rows of each batch are read and converted).

    shuffle=True: order = a permutation drawn from (seed, epoch) alone (a private torch.Generator, the
    global RNG is untouched), split across ranks as perm[rank::world_size], last partial batch dropped
    by default so every rank makes the same number of steps. Resume mid-epoch with `skip_batches`.
    shuffle=False: file order, every sample once, last batch may be short."""

    def __init__(self, tokens: TokenSet, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                 skip_batches: int = 0, drop_last: bool | None = None, rank: int = 0, world_size: int = 1):
        count = len(tokens.labels)
        if shuffle:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(count, generator=generator).numpy()
        else:
            order = np.arange(count)
        per_rank = count // world_size if shuffle else -(-count // world_size)  # equal shares when training
        self.order = order[rank::world_size][:per_rank]
        self.tokens, self.batch_size, self.skip_batches = tokens, batch_size, skip_batches
        self.drop_last = shuffle if drop_last is None else drop_last

    def __len__(self) -> int:
        full, rest = divmod(len(self.order), self.batch_size)
        return max(0, full + (rest > 0 and not self.drop_last) - self.skip_batches)

    def __iter__(self) -> Iterator[TokenBatch]:
        for b in range(self.skip_batches, self.skip_batches + len(self)):
            rows = self.order[b * self.batch_size : (b + 1) * self.batch_size]
            yield TokenBatch(torch.from_numpy(self.tokens.codes[rows].astype(np.int64)),
                             torch.from_numpy(self.tokens.labels[rows]))


def token_loader(location: str | Path, split: str, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                 skip_batches: int = 0, drop_last: bool | None = None, rank: int = 0, world_size: int = 1,
                 cache_dir: str | Path = "") -> TokenLoader:
    """A split of a token directory or URL, memory-mapped (`open_tokens`; see `TokenLoader` for order and resume)."""
    return TokenLoader(open_tokens(location, split, cache_dir), batch_size, shuffle, seed, epoch, skip_batches,
                       drop_last, rank, world_size)
