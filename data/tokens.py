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
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch

from data.files import write_json_atomic
from data.media import MediaSpec
from data.shards import MANIFEST, SPLITS, AtomicTar, ManifestError, iter_shard_samples, list_shards, shard_name

TOKEN_FORMAT = "simvq-token-shards"
TOKEN_VERSION = 1
ENCODE_HINT = "run `python -m pipelines.encode_shards` to (re-)encode the media shards with this tokenizer"


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
    format: str = TOKEN_FORMAT
    version: int = TOKEN_VERSION

    def __post_init__(self) -> None:
        expected = code_dtype(self.num_codes).name
        if self.dtype and self.dtype != expected:
            raise ManifestError(f"token manifest says dtype {self.dtype} but K={self.num_codes} is stored as "
                                f"{expected}; the manifest is corrupt: {ENCODE_HINT}")
        self.dtype = expected
        self.grid = [int(g) for g in self.grid]

    @property
    def seq_len(self) -> int:
        return math.prod(self.grid)

    def save(self, directory: str | Path) -> None:
        write_json_atomic(Path(directory) / MANIFEST, asdict(self))

    @classmethod
    def load(cls, directory: str | Path) -> "TokenManifest":
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise ManifestError(f"{path} not found: {directory} holds no finished token shards; {ENCODE_HINT}")
        d = json.loads(path.read_text())
        if d.get("format") != TOKEN_FORMAT or d.get("version") != TOKEN_VERSION:
            raise ManifestError(f"{path} has format {d.get('format')!r} version {d.get('version')!r}, expected "
                                f"{TOKEN_FORMAT!r} version {TOKEN_VERSION}; {ENCODE_HINT}")
        return cls(**d)

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
    media_path: Path  # input media shard
    token_path: Path  # where its token shard goes


def pending_token_shards(media_dir: str | Path, token_dir: str | Path) -> list[PendingShard]:
    """Media shards whose token shard does not exist yet (a token shard that exists is complete,
    because it was renamed into place only after being fully written)."""
    pending = []
    for split in SPLITS:
        for media_path in list_shards(media_dir, split):
            index = int(media_path.stem.split("-")[1])
            token_path = Path(token_dir) / shard_name(split, index)
            if not token_path.exists():
                pending.append(PendingShard(split, index, media_path, token_path))
    return pending


# ---------------------------------------------------------------------------------------- the reader
class TokenSet(NamedTuple):
    codes: np.ndarray  # (N, L) in the stored dtype, L = prod(grid), raster order
    labels: np.ndarray  # (N,) int64
    keys: list[str]


class TokenBatch(NamedTuple):
    tokens: torch.Tensor  # (B, L) int64
    labels: torch.Tensor  # (B,) int64


def load_tokens(directory: str | Path, split: str) -> TokenSet:
    """All samples of one split in memory (2 bytes per token for K <= 65,536: ImageNet at 16x16 is ~650 MB)."""
    manifest = TokenManifest.load(directory)
    dtype, length = np.dtype(manifest.dtype).newbyteorder("<"), manifest.seq_len
    paths = list_shards(directory, split)
    if len(paths) != manifest.shards.get(split, len(paths)):
        raise ManifestError(f"{Path(directory) / MANIFEST} lists {manifest.shards[split]} {split} shards but "
                            f"{len(paths)} exist; the encode did not finish: {ENCODE_HINT}")
    rows, labels, keys = [], [], []
    for path in paths:
        for key, fields in iter_shard_samples(path):
            if len(fields.get("codes", b"")) != length * dtype.itemsize:
                raise ManifestError(f"{path}: sample {key!r} has {len(fields.get('codes', b''))} code bytes, "
                                    f"expected {length} x {dtype.itemsize} (grid {manifest.grid}); {ENCODE_HINT}")
            rows.append(np.frombuffer(fields["codes"], dtype=dtype))
            labels.append(int(fields["cls"]))
            keys.append(key)
    if len(keys) != manifest.counts.get(split, len(keys)):
        raise ManifestError(f"{directory}: {len(keys)} {split} samples on disk, manifest says {manifest.counts[split]}")
    codes = np.stack(rows) if rows else np.zeros((0, length), dtype)  # (N, L)
    return TokenSet(codes, np.asarray(labels, dtype=np.int64), keys)


class TokenLoader:
    """Batches of `TokenBatch(tokens (B, L) int64, labels (B,))` from an in-memory split.

    shuffle=True: order = a permutation drawn from (seed, epoch) alone (a private torch.Generator, the
    global RNG is untouched), split across ranks as perm[rank::world_size], last partial batch dropped
    by default so every rank makes the same number of steps. Resume mid-epoch with `skip_batches`.
    shuffle=False: file order, every sample once, last batch may be short."""

    def __init__(self, tokens: TokenSet, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                 skip_batches: int = 0, drop_last: bool | None = None, rank: int = 0, world_size: int = 1):
        count = len(tokens.keys)
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


def token_loader(directory: str | Path, split: str, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                 skip_batches: int = 0, drop_last: bool | None = None, rank: int = 0,
                 world_size: int = 1) -> TokenLoader:
    """Read a split of a token directory (see `TokenLoader` for order and resume)."""
    return TokenLoader(load_tokens(directory, split), batch_size, shuffle, seed, epoch, skip_batches, drop_last,
                       rank, world_size)
