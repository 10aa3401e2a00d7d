"""Integer codes made elsewhere -> token shards a prior trains on (the output of encode_shards, without media).

    # LlamaGen's layout: one .npy per sample, labels in a sibling folder with the same file names
    python -m pipelines.pack_tokens --codes=codes/imagenet256_codes --labels=codes/imagenet256_labels \\
        --tokenizer=runs/official/simvq-1k --out=runs/imagenet/tokens --val_fraction=0.01
    # one array (N, ...) in a .npy, or a .npz holding `codes` (and optionally `labels`)
    python -m pipelines.pack_tokens --codes=codes.npz --num_codes=1024 --grid=16,16 --out=runs/x/tokens

Every array is checked before anything is written: integer dtype (a float array, NaN or not, is refused), codes in
[0, K), one shape for all samples. K, the quantizer and the grid come from `--tokenizer` (the checkpoint that made
the codes, e.g. one converted by `pipelines.import_official`) or from `--num_codes`/`--grid`. The manifest names the
source (path and sha256) and the tokenizer's weights sha256, so `sample` decodes the prior's codes only with that
tokenizer; packed without `--tokenizer`, no tokenizer can decode them (train_prior still runs).

Per-sample shapes: `grid` itself, or any shape with as many codes (e.g. LlamaGen's (1, 256) for a 16x16 grid), or
(A, *grid)/(A, prod(grid)): A augmented views (LlamaGen's ten-crop), of which `--view` keeps one (-1 = each view as
its own sample, keyed `<name>-v<a>`). Without `--grid`, the grid is the sample's shape with leading 1s dropped; a
flat length L for a 2-D tokenizer becomes (sqrt L, sqrt L).
"""
from __future__ import annotations

import hashlib
import io
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from data.errors import UserError
from data.files import sha256_file
from data.shards import MANIFEST, assign_split, shard_name
from data.tokens import TokenManifest, TokenSample, write_token_shard
from pipelines.checkpoint import load_config, resolve_checkpoint, weights_sha256
from pipelines.cli import run
from pipelines.config import required

SPLIT_ORDER = ("train", "val")


@dataclass
class PackTokensConfig:
    codes: str = required()  # a folder of one .npy per sample (LlamaGen), or one .npy/.npz array (N, ...)
    out: str = required()  # token shard directory to write
    labels: str = ""  # folder of one .npy per sample (same names) or a .npy (N,); "" = the .npz's labels or none
    tokenizer: str = ""  # the tokenizer checkpoint that made the codes (K, quantizer, and the one `sample` accepts)
    num_codes: int = 0  # K, when no --tokenizer is given
    grid: tuple[int, ...] = ()  # code grid of one sample, e.g. 16,16; () = inferred (see the module doc)
    view: int = 0  # which of A augmented views (A, *grid) to keep; -1 = every view as its own sample
    codes_key: str = "codes"  # array names inside a .npz
    labels_key: str = "labels"
    class_names: tuple[str, ...] = ()  # names of labels 0..n-1; () = "0", "1", ...
    val_fraction: float = 0.0  # share of samples held out as val, by a hash of the key (as make_shards)
    split_seed: int = 0
    shard_size: int = 10_000  # samples per token shard
    overwrite: bool = False  # replace a finished token directory at --out


class PackError(UserError, ValueError):
    """Codes or labels that cannot become token shards as they are."""


# ---------------------------------------------------------------------------------------------- reading
def _natural(path: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.stem)]


def _load_npy(path: Path, raw: bytes | None = None) -> np.ndarray:
    """`path` as an array (parsed from `raw` when its bytes were read already); pickled objects are refused."""
    try:
        return np.load(io.BytesIO(raw) if raw is not None else path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise PackError(f"{path}: not a readable .npy array without pickled objects ({e})") from None


def read_samples(codes: str, labels: str, codes_key: str, labels_key: str
                 ) -> tuple[list[tuple[str, np.ndarray, int]], bool, str]:
    """([(key, code array, label)], labelled, sha256 of the source) from a folder or an array file."""
    src = Path(codes)
    own_labels = None  # a .npz's labels array
    if src.is_dir():
        files = sorted(src.glob("*.npy"), key=_natural)
        if not files:
            raise PackError(f"--codes={src}: no .npy files in the folder")
        arrays, digest = [], hashlib.sha256()
        for f in files:  # each file read once: hashed for the manifest, then parsed
            raw = f.read_bytes()
            digest.update(f"{f.name}:{hashlib.sha256(raw).hexdigest()}\n".encode())
            arrays.append((f.stem.replace(".", "_"), _load_npy(f, raw)))
        sha = digest.hexdigest()
    elif src.suffix in (".npy", ".npz") and src.is_file():
        if src.suffix == ".npz":
            with np.load(src, allow_pickle=False) as z:
                if codes_key not in z:
                    raise PackError(f"--codes={src} has no array {codes_key!r} (it has {sorted(z.files)}); set "
                                    f"--codes_key")
                block = z[codes_key]
                if not labels and labels_key in z:
                    own_labels, labels = z[labels_key], f"{src}[{labels_key}]"
        else:
            block = _load_npy(src)
        if block.ndim < 2:
            raise PackError(f"--codes={src} has shape {block.shape}; expected (N, ...) with one row per sample")
        arrays = [(f"{i:08d}", block[i]) for i in range(len(block))]
        sha = sha256_file(src)
    else:
        raise PackError(f"--codes={src}: not a folder of .npy files nor a .npy/.npz file")

    if not labels:
        return [(k, a, -1) for k, a in arrays], False, sha
    if own_labels is not None:
        values = own_labels
    elif Path(labels).is_dir():
        values = []
        for key, _ in arrays:
            f = Path(labels) / f"{key}.npy"
            if not f.is_file():
                raise PackError(f"--labels={labels}: no {f.name} for the codes of sample {key!r}")
            values.append(_load_npy(f).reshape(-1)[:1])
        values = np.concatenate(values) if values else np.zeros(0, np.int64)
    else:
        values = _load_npy(Path(labels))
    values = np.asarray(values).reshape(-1)
    if values.shape[0] != len(arrays):
        raise PackError(f"--labels={labels}: {values.shape[0]} labels for {len(arrays)} samples")
    check_integers(values, f"--labels={labels}")
    if values.size and values.min() < 0:
        raise PackError(f"--labels={labels}: label {values.min()} < 0; labels are class indices 0..n-1")
    return [(k, a, int(v)) for (k, a), v in zip(arrays, values)], True, sha


def check_integers(a: np.ndarray, where: str) -> None:
    if a.dtype.kind in "iu":
        return
    if a.dtype.kind == "f":
        nan = " (some are NaN)" if np.isnan(a).any() else ""
        raise PackError(f"{where} holds {a.dtype} values{nan}; codes and labels must be integer arrays: save the "
                        f"integer codes the tokenizer returned")
    raise PackError(f"{where} holds {a.dtype} values; codes and labels must be integer arrays")


# ---------------------------------------------------------------------------------------------- shapes
def infer_grid(shape: tuple[int, ...], dims: int | None) -> tuple[int, ...]:
    """The grid of one sample when --grid is not given (see the module doc)."""
    shape = tuple(shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) == 1 and dims == 2:
        side = math.isqrt(shape[0])
        if side * side != shape[0]:
            raise PackError(f"codes of length {shape[0]} for a 2-D tokenizer are not a square grid; pass --grid=H,W")
        return side, side
    if dims is not None and len(shape) != dims:
        raise PackError(f"codes of shape {shape} for a {dims}-D tokenizer: pass --grid")
    return shape


def views(key: str, codes: np.ndarray, grid: tuple[int, ...], view: int) -> Iterator[tuple[str, np.ndarray]]:
    """(key, codes shaped `grid`) for each kept view of one sample's array."""
    n = math.prod(grid)
    if codes.size % n or codes.size == 0:
        raise PackError(f"sample {key!r}: shape {codes.shape} does not hold whole grids of {list(grid)}; every "
                        f"sample must have one shape (pass --grid for a flat one)")
    count = codes.size // n
    if count > 1 and codes.shape[0] != count:
        raise PackError(f"sample {key!r}: shape {codes.shape} is not (views, *grid) for grid {list(grid)}")
    stacked = codes.reshape(count, *grid)
    if view == -1:
        for a in range(count):
            yield (f"{key}-v{a}" if count > 1 else key), stacked[a]
    elif view >= count:
        raise PackError(f"--view={view} but sample {key!r} has {count} view(s)")
    else:
        yield key, stacked[view]


# ---------------------------------------------------------------------------------------------- main
def tokenizer_identity(cfg: PackTokensConfig) -> tuple[dict, int | None]:
    """({tokenizer_sha256, quantizer, num_codes, path}, tokenizer dims) from --tokenizer or --num_codes."""
    if cfg.tokenizer:
        ckpt = resolve_checkpoint(cfg.tokenizer)
        meta = load_config(ckpt)
        if meta.get("kind") != "tokenizer":
            raise PackError(f"--tokenizer={cfg.tokenizer} holds a {meta.get('kind')!r} checkpoint, not a tokenizer")
        tok = meta["config"]
        if cfg.num_codes and cfg.num_codes != tok["num_codes"]:
            raise PackError(f"--num_codes={cfg.num_codes} but the tokenizer {ckpt} has K={tok['num_codes']}; leave "
                            f"--num_codes unset")
        return ({"tokenizer_sha256": weights_sha256(ckpt), "quantizer": tok["quantizer"],
                 "num_codes": tok["num_codes"], "path": str(ckpt)}, tok["dims"])
    if cfg.num_codes < 1:
        raise PackError("pass --tokenizer=<the checkpoint that made the codes> (or at least --num_codes=K): the "
                        "codebook size cannot be guessed from the codes")
    return {"tokenizer_sha256": "", "quantizer": "unknown", "num_codes": cfg.num_codes, "path": ""}, None


def main(cfg: PackTokensConfig) -> TokenManifest:
    out = Path(cfg.out)
    if (out / MANIFEST).is_file() and not cfg.overwrite:
        raise UserError(f"--out={out} already holds token shards; pass --overwrite=true to replace them")
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"--val_fraction={cfg.val_fraction} must be in [0, 1)")
    identity, dims = tokenizer_identity(cfg)
    k = identity["num_codes"]
    samples, labelled, sha = read_samples(cfg.codes, cfg.labels, cfg.codes_key, cfg.labels_key)
    grid = tuple(cfg.grid) or infer_grid(samples[0][1].shape, dims)
    if dims is not None and len(grid) != dims:
        raise PackError(f"--grid={list(grid)} is {len(grid)}-D but the tokenizer is {dims}-D")

    # check every sample before writing anything
    splits: dict[str, list[TokenSample]] = {s: [] for s in SPLIT_ORDER}
    first_shape = samples[0][1].shape
    for key, codes, label in samples:
        where = f"--codes={cfg.codes} sample {key!r}"
        if codes.shape != first_shape:
            raise PackError(f"{where} has shape {codes.shape}, the first sample {first_shape}; every sample must "
                            f"have one shape")
        check_integers(codes, where)
        if codes.size and (codes.min() < 0 or codes.max() >= k):
            raise PackError(f"{where} has codes in [{codes.min()}, {codes.max()}], outside [0, {k}) (K={k}); the "
                            f"codes were made by another tokenizer or the wrong --num_codes")
        for name, grid_codes in views(key, codes, grid, cfg.view):
            split = assign_split(name, cfg.split_seed, cfg.val_fraction) if cfg.val_fraction else "train"
            splits[split].append(TokenSample(name, grid_codes, label))

    n_classes = max((s.label for v in splits.values() for s in v), default=-1) + 1 if labelled else 0
    class_names = list(cfg.class_names) or [str(i) for i in range(n_classes)]
    if labelled and len(class_names) < n_classes:
        raise PackError(f"--class_names names {len(class_names)} classes but the labels reach {n_classes - 1}")

    # write: shards (each atomic), then the manifest last
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    counts, shard_counts = {}, {}
    for split, rows in splits.items():
        if not rows:
            continue
        chunks = [rows[i:i + cfg.shard_size] for i in range(0, len(rows), cfg.shard_size)]
        for index, chunk in enumerate(chunks):
            write_token_shard(out / shard_name(split, index), chunk, k, grid)
        counts[split], shard_counts[split] = len(rows), len(chunks)
    source = {"command": "pack_tokens", "codes": str(Path(cfg.codes).resolve()), "sha256": sha,
              "labels": str(Path(cfg.labels).resolve()) if cfg.labels else "", "tokenizer": identity["path"]}
    manifest = TokenManifest(tokenizer_sha256=identity["tokenizer_sha256"], quantizer=identity["quantizer"],
                             num_codes=k, grid=list(grid), counts=counts, class_names=class_names,
                             source_manifest_sha256=sha, shards=shard_counts, source=source)
    manifest.save(out)
    print(f"pack_tokens: {counts} samples, grid {list(grid)}, K={k}, {len(class_names)} classes -> {out / MANIFEST}"
          + ("" if identity["tokenizer_sha256"] else "; packed without --tokenizer: `sample` cannot decode a "
             "prior trained on these codes") + f"; next: `python -m pipelines.train_prior --tokens={out}`")
    return manifest


if __name__ == "__main__":
    run(main, PackTokensConfig)
