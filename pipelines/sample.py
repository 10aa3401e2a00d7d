"""Sample images: prior -> codes -> tokenizer.decode -> PNG files, grids and a manifest.

    python -m pipelines.sample --prior=runs/digits/prior --tokenizer=runs/digits/tokenizer --out=runs/digits/samples
    python -m pipelines.sample ... --num_per_class=100 --classes=3,7 --settings.cfg_scale=2 --settings.top_k=100
    python -m pipelines.sample ... --num=64                  # unconditional: the null class (or a num_classes=0 prior)

Writes
    out/images/{class}/{index:06d}.png    (out/images/{index:06d}.png when unconditional)
    out/grids/{class}.png                 the first `grid_per_class` samples of each class
    out/grid.png                          overview: one row per class, `overview_cols` samples each
    out/manifest.json                     both checkpoints + hashes, seed, every setting, count, classes, sizes, and
                                          `images`: per sample its path, label and seed (written last, atomically)

Sample i (in output order: class by class, in the order of `classes`) uses seed `seed + i`, and prior/sampling.py
draws each sample's randomness from its own seed, so an image does not depend on the batch size or its batch-mates.
The prior records which tokenizer made its training tokens (train_config.token_manifest); a tokenizer with another
hash, K, quantizer or grid is refused, since its codes would mean different images.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image

from data.shards import write_text_atomic
from pipelines.checkpoint import checkpoint_hash, load_config, load_prior, load_tokenizer, weights_sha256
from pipelines.config import parse_config, to_dict
from prior import Prior, SampleSettings, sample

SAMPLES_FORMAT = "simvq-samples"
SAMPLES_VERSION = 1
PRIOR_HINT = "train one with `python -m pipelines.train_prior --tokens=<token shards of this tokenizer>`"


class IncompatibleCheckpoints(ValueError):
    """A prior and a tokenizer that do not belong together: the prior's codes would decode to the wrong images."""


@dataclass
class SampleConfig:
    prior: str = "runs/digits/prior"  # prior checkpoint or run directory (newest checkpoint)
    tokenizer: str = "runs/digits/tokenizer"  # tokenizer checkpoint or run directory; must be the prior's tokenizer
    out: str = "runs/digits/samples"  # output directory (images/, grids/, grid.png, manifest.json)
    num_per_class: int = 10  # samples per class; an unconditional prior counts as one class
    num: int = 0  # > 0: that many unconditional samples (null class) instead of num_per_class per class
    classes: list[str] = field(default_factory=list)  # class names (or indices) to sample; empty = all
    batch_size: int = 64  # samples per prior forward; does not change the images
    decode_batch: int = 64  # images per decoder forward; fixed, so pixels never depend on batch_size (see generate)
    seed: int = 0  # sample i uses seed + i
    grid_per_class: int = 64  # samples in each out/grids/{class}.png
    overview_cols: int = 10  # samples per class row in out/grid.png
    overwrite: bool = False  # replace the samples of an earlier run in `out`
    device: str = "auto"  # auto = cuda when available, else cpu; or e.g. cpu, cuda:1
    settings: SampleSettings = field(default_factory=SampleSettings)  # temperature, top-k/p, min-p, CFG, kv cache


# ---------------------------------------------------------------------------------------- checkpoints
def identity(ckpt: Path) -> dict:
    return {"path": str(ckpt), "checkpoint_sha256": checkpoint_hash(ckpt), "weights_sha256": weights_sha256(ckpt)}


def check_pair(prior: Prior, prior_config: dict, prior_ckpt: Path, tokenizer_ckpt: Path) -> dict:
    """Refuse a tokenizer other than the one whose codes trained the prior; returns the prior's token manifest."""
    recorded = prior_config.get("train_config", {}).get("token_manifest")
    if recorded is None:
        raise IncompatibleCheckpoints(f"{prior_ckpt}/config.json records no token manifest, so the tokenizer it "
                                      f"was trained for is unknown; {PRIOR_HINT}")
    tok = load_config(tokenizer_ckpt)["config"]
    actual = {"tokenizer_sha256": weights_sha256(tokenizer_ckpt), "num_codes": tok["num_codes"],
              "quantizer": tok["quantizer"]}
    diffs = [f"{k}: prior trained on {recorded[k]!r}, tokenizer has {v!r}" for k, v in actual.items()
             if recorded[k] != v]
    grid = [int(g) for g in recorded["grid"]]
    if len(grid) != tok["dims"]:
        diffs.append(f"grid: prior trained on a {len(grid)}-d grid {grid}, tokenizer is {tok['dims']}-d")
    if math.prod(grid) != prior.cfg.seq_len or recorded["num_codes"] != prior.cfg.num_codes:
        diffs.append(f"prior model (K={prior.cfg.num_codes}, seq_len={prior.cfg.seq_len}) disagrees with its own "
                     f"token manifest (K={recorded['num_codes']}, grid={grid})")
    if diffs:
        raise IncompatibleCheckpoints(
            f"prior {prior_ckpt} and tokenizer {tokenizer_ckpt} do not belong together: " + "; ".join(diffs)
            + ". Pass the tokenizer that encoded the prior's token shards, or encode with this one (`python -m "
            "pipelines.encode_shards`) and retrain the prior (`python -m pipelines.train_prior`)")
    return recorded


# ---------------------------------------------------------------------------------------- generation
def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) -> uint8 RGB (N, 3, H, W); grayscale is repeated over the 3 channels."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def sample_codes(prior: Prior, labels: torch.Tensor | None, settings: SampleSettings, seeds: Sequence[int],
                 grid: Sequence[int], num_codes: int) -> torch.Tensor:
    """Codes (B, *grid) int64 for B = len(seeds), checked to lie in the tokenizer's [0, num_codes)."""
    device = next(prior.parameters()).device
    # bf16 for the transformer trunk; Prior.step and sampling keep the logits, CFG and filters in fp32 themselves
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        codes = sample(prior, None if labels is None else labels.to(device), math.prod(grid), settings, seeds)
    if codes.min() < 0 or codes.max() >= num_codes:
        raise IncompatibleCheckpoints(f"the prior sampled codes in [{int(codes.min())}, {int(codes.max())}] but the "
                                      f"tokenizer has K={num_codes}: they were not trained together")
    return codes.view(len(seeds), *grid)  # (B, L) -> (B, *grid): raster order, as data/tokens.py stores them


@torch.no_grad()
def generate(prior: Prior, tokenizer: torch.nn.Module, labels: torch.Tensor | None, settings: SampleSettings,
             seeds: Sequence[int], grid: Sequence[int], batch_size: int = 0, decode_batch: int = 64) -> torch.Tensor:
    """Sample len(seeds) images -> uint8 (N, 3, H, W) on the CPU; `labels` (N,) or None (null class).

    The prior runs `batch_size` samples at a time (0 = all) under bf16 autocast on CUDA (its output head, CFG and
    filters in fp32: prior/sampling.py); its codes depend only on (seed, label). The decoder (fp32) runs fixed groups of `decode_batch` counted from the first sample, because
    conv kernels round differently for different batch shapes (~3e-6 on CPU, enough to flip a uint8 now and then):
    so the pixels of sample i depend on batch_size not at all, and on where this call starts only through
    decode_batch.
    """
    n = len(seeds)
    batch_size = batch_size or n
    codes = torch.cat([
        sample_codes(prior, None if labels is None else labels[i:i + batch_size], settings, seeds[i:i + batch_size],
                     grid, tokenizer.quantizer.num_codes).cpu()
        for i in range(0, n, batch_size)])  # (N, *grid)
    tok_device = next(tokenizer.parameters()).device
    return torch.cat([to_uint8(tokenizer.decode(codes[i:i + decode_batch].to(tok_device))).cpu()
                      for i in range(0, n, decode_batch)])  # (N, 3, H, W)


# ---------------------------------------------------------------------------------------- files
def write_png(image: torch.Tensor, path: Path) -> None:
    """uint8 (3, H, W) -> PNG, renamed into place so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())).save(tmp, format="PNG")
    os.replace(tmp, path)


def tile(images: torch.Tensor, cols: int, pad: int = 2) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> one uint8 (3, rows*(H+pad)+pad, cols*(W+pad)+pad) image, white borders, row-major."""
    rows = max(1, -(-images.shape[0] // cols))
    blank = torch.full((rows * cols - images.shape[0], *images.shape[1:]), 255, dtype=torch.uint8)
    x = F.pad(torch.cat([images, blank]), (0, pad, 0, pad), value=255)  # (rows*cols, 3, H+pad, W+pad)
    x = rearrange(x, "(r c) ch h w -> ch (r h) (c w)", c=cols)
    return F.pad(x, (pad, 0, pad, 0), value=255)


def class_dirname(name: str) -> str:
    safe = name.replace(os.sep, "_").replace("/", "_").strip()
    return safe if safe and safe not in (".", "..") else "_"


def resolve_classes(wanted: list[str], names: list[str]) -> list[int]:
    """Class indices for names (or integer indices) in `wanted`; empty = all classes."""
    if not wanted:
        return list(range(len(names)))
    out = []
    for w in wanted:
        if w in names:
            out.append(names.index(w))
        elif w.lstrip("-").isdigit() and 0 <= int(w) < len(names):
            out.append(int(w))
        else:
            raise ValueError(f"--classes: {w!r} is neither a class name nor an index of {names}")
    return out


def main(argv: list[str] | None = None, base: dict | None = None) -> dict:
    cfg = parse_config(SampleConfig, argv, base)
    if cfg.batch_size < 1 or cfg.decode_batch < 1:
        raise ValueError(f"--batch_size and --decode_batch must be >= 1 (got {cfg.batch_size}, {cfg.decode_batch})")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    prior, prior_ckpt, prior_config = load_prior(cfg.prior, device)
    tokenizer, tokenizer_ckpt = load_tokenizer(cfg.tokenizer, device)
    recorded = check_pair(prior, prior_config, prior_ckpt, tokenizer_ckpt)
    grid, names = [int(g) for g in recorded["grid"]], list(recorded["class_names"])

    # The plan: one (label, class name) per sample, in output order; sample i gets seed + i.
    if cfg.num > 0:
        plan = [(None, None)] * cfg.num
    elif cfg.num_per_class < 1:
        raise ValueError(f"--num_per_class must be >= 1 (got {cfg.num_per_class}), or pass --num=N")
    elif not prior.conditional:  # one "class": the same settings serve labelled and unlabelled data (compare)
        plan = [(None, None)] * cfg.num_per_class
    else:
        plan = [(c, names[c]) for c in resolve_classes(cfg.classes, names) for _ in range(cfg.num_per_class)]
    seeds = [cfg.seed + i for i in range(len(plan))]
    if not prior.conditional and cfg.settings.cfg_scale != 1.0:
        # Guidance needs a class to move towards; the manifest records the scale actually used.
        print(f"sample: {prior_ckpt} is unconditional, so cfg_scale={cfg.settings.cfg_scale} becomes 1 (no guidance)")
        cfg.settings = dataclasses.replace(cfg.settings, cfg_scale=1.0)

    out = Path(cfg.out)
    if (out / "manifest.json").exists() and not cfg.overwrite:
        raise FileExistsError(f"{out}/manifest.json exists: {out} already holds samples; pass --overwrite=true or "
                              f"choose another --out")
    (out / "manifest.json").unlink(missing_ok=True)  # from here on, an interrupted run leaves no manifest
    for old in (out / "images", out / "grids"):
        shutil.rmtree(old, ignore_errors=True)

    records, shown = [], {}  # shown: class name (or None) -> first images, for the grids
    per_class_index: dict[str | None, int] = {}
    keep = max(cfg.grid_per_class, cfg.overview_cols if cfg.num == 0 else cfg.overview_cols ** 2)
    # Chunks start at multiples of decode_batch, so every decoder group holds the same samples for any batch_size.
    chunk_size = -(-max(cfg.batch_size, cfg.decode_batch) // cfg.decode_batch) * cfg.decode_batch
    for start in range(0, len(plan), chunk_size):
        chunk = plan[start:start + chunk_size]
        labels = None if chunk[0][0] is None else torch.tensor([c for c, _ in chunk])
        images = generate(prior, tokenizer, labels, cfg.settings, seeds[start:start + len(chunk)], grid,
                          batch_size=cfg.batch_size, decode_batch=cfg.decode_batch)  # (n, 3, H, W) uint8
        image_size = list(images.shape[-2:])  # (H, W)
        for j, ((label, name), image) in enumerate(zip(chunk, images)):
            index = per_class_index.get(name, 0)
            per_class_index[name] = index + 1
            rel = (Path("images") / f"{index:06d}.png" if name is None
                   else Path("images") / class_dirname(name) / f"{index:06d}.png")
            write_png(image, out / rel)
            records.append({"path": rel.as_posix(), "label": -1 if label is None else label, "class": name,
                            "seed": seeds[start + j]})
            if index < keep:
                shown.setdefault(name, []).append(image)

    # Grids: one per class, and the overview (rows = classes; unconditional: a square of the first samples).
    for name, firsts in shown.items():
        if name is not None:
            x = torch.stack(firsts[:cfg.grid_per_class])
            write_png(tile(x, math.ceil(math.sqrt(len(x)))), out / "grids" / f"{class_dirname(name)}.png")
    if cfg.num > 0:
        overview = tile(torch.stack(shown[None][:cfg.overview_cols ** 2]), cfg.overview_cols)
    else:
        overview = tile(torch.cat([torch.stack(v[:cfg.overview_cols]) for v in shown.values()]),
                        min(cfg.overview_cols, cfg.num_per_class))
    write_png(overview, out / "grid.png")

    manifest = {
        "format": SAMPLES_FORMAT, "version": SAMPLES_VERSION,
        "prior": {**identity(prior_ckpt), "step": prior_config.get("step")},
        "tokenizer": identity(tokenizer_ckpt),
        "source_manifest_sha256": recorded.get("source_manifest_sha256"),  # the media the prior's tokens came from
        "seed": cfg.seed, "settings": to_dict(cfg.settings), "count": len(records),
        "conditional": plan[0][0] is not None, "num_per_class": cfg.num_per_class if cfg.num == 0 else 0,
        "classes": [n for n in dict.fromkeys(name for _, name in plan) if n is not None],
        "class_names": names, "image_size": image_size, "grid": grid,
        "device": str(device), "prior_precision": "bf16" if device.type == "cuda" else "fp32",
        "token_manifest": recorded,
        "images": records,
    }
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    print(f"wrote {len(records)} samples to {out}/images, {out}/grid.png and {out}/manifest.json")
    return {k: v for k, v in manifest.items() if k != "images"}  # the per-image list stays on disk


if __name__ == "__main__":
    main()
