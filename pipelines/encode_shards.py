"""Media shards + tokenizer checkpoint -> token shards + manifest.json (the input of the prior).

    python -m pipelines.encode_shards --data=runs/digits/shards --tokenizer=runs/digits/tokenizer \
        --out=runs/digits/tokens
    accelerate launch -m pipelines.encode_shards --data=... --tokenizer=... --out=...     # shards split over processes
    accelerate launch --multi_gpu --num_processes=2 -m pipelines.encode_shards ...       # 2 CPU processes, no GPU
    python -m pipelines.encode_shards --data=https://host/digits/shards ...              # media read from a URL
    python -m pipelines.encode_shards --data='pipe:aws s3 cp s3://bucket/digits/shards/{} -' ...
    python -m pipelines.encode_shards ... --overwrite=true     # replace tokens made by another tokenizer / media set

`--data` is a local directory or a URL (data/shards.py: http(s) base URL, or a `pipe:` command with {} for the file
name); the shards are the ones its manifest names. The token output is always a local directory.

Each media shard `{split}-{index:06d}.tar` becomes the token shard of the same name, made from exactly that shard:
its samples are read in file order (data.shards.iter_shard_samples), decoded with the *eval* view (center crop,
rng=None), encoded, and written atomically (data.tokens.write_token_shard). A token shard that exists is therefore
complete and final, and a rerun after an interruption encodes only `pending_token_shards` (no sample lost or
written twice). Process i of N takes pending[i::N]; the main process writes manifest.json last, after checking that
every split holds exactly the media manifest's sample count. The manifest also says what one token stands for
(`media`, data.tokens.media_timing): for audio the sample rate, the hop and tokens per second (16 kHz / 320 = 50).

Identity. `tokenizer_sha256` is the sha256 of the checkpoint's model.safetensors (the TokenManifest field's
definition; not pipelines.checkpoint.checkpoint_hash, whose config.json also carries the training step and run
settings, which do not change a single code). Use `weights_sha256(ckpt)` below to compare against it.
`source_manifest_sha256` is the sha256 of the media manifest.json. Both are also written to `encode.json` when a
run starts, so an interrupted directory (shards, no manifest yet) is still refused by a different tokenizer or
media set instead of being silently completed with mixed codes.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch
from accelerate import Accelerator

from data.errors import UserError
from data.files import write_json_atomic
from data.reader import decode_sample
from data.shards import (MANIFEST, SPLITS, ManifestError, MediaManifest, check_counts, count_samples, file_url,
                         iter_shard_samples, list_shards, manifest_sha256, read_manifest, remove_temp_files)
from data.tokens import (ENCODE_HINT, PendingShard, TokenManifest, TokenSample, media_timing, pending_token_shards,
                         write_token_shard)
from pipelines.checkpoint import load_config, load_tokenizer, weights_sha256
from pipelines.cli import run
from pipelines.config import ConfigError, required, to_dict
from pipelines.device import resolve_device

IDENTITY = "encode.json"  # written at the start of a run: what the shards in this directory are made from


@dataclass
class EncodeShardsConfig:
    data: str = required()  # media shards (python -m pipelines.make_shards): a directory, http(s) URL or pipe:...{}
    tokenizer: str = required()  # tokenizer checkpoint, or run directory (its newest checkpoint)
    out: str = required()  # token shard directory
    batch_size: int = 256  # samples per encoder forward
    splits: tuple[Literal["train", "val"], ...] = ("train", "val")  # which splits to encode (--splits=val)
    device: str = "auto"  # auto (the accelerator's device: cuda:<local rank> or cpu) | cpu | cuda
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"  # encoder autocast; auto = bf16 on CUDA only (the
    # nearest-code search stays fp32 inside the quantizer; bf16 on CPU is slower than fp32)
    overwrite: bool = False  # replace token shards made from another tokenizer or media set


def _rerun_hint(cfg: EncodeShardsConfig) -> str:
    return (f"pass --overwrite=true to replace them, or choose another --out (`python -m pipelines.encode_shards "
            f"--data={cfg.data} --tokenizer={cfg.tokenizer} --out=NEW_DIR`)")


# ------------------------------------------------------------------------------ the output directory
def check_out_dir(out: Path, identity: dict[str, str], cfg: EncodeShardsConfig) -> None:
    """Refuse an out dir that holds tokens of another tokenizer or media set (or of unknown origin)."""
    if (out / MANIFEST).is_file():
        try:
            TokenManifest.load(out).check_compatible(**identity)
        except ManifestError as exc:
            raise ManifestError(f"{out}: {exc} -- {_rerun_hint(cfg)}") from exc
    if (out / IDENTITY).is_file():
        recorded = json.loads((out / IDENTITY).read_text())
        diffs = [f"{k}: {out / IDENTITY} has {recorded.get(k)!r}, this run has {v!r}"
                 for k, v in identity.items() if recorded.get(k) != v]
        if diffs:
            raise ManifestError(f"{out} holds (possibly unfinished) token shards of another tokenizer or media set: "
                                + "; ".join(diffs) + f" -- {_rerun_hint(cfg)}")
    elif any(list_shards(out, split) for split in SPLITS):
        raise ManifestError(f"{out} holds token shards but no {IDENTITY}: their tokenizer is unknown -- "
                            f"{_rerun_hint(cfg)}")


def prepare_out_dir(out: Path, identity: dict[str, str], cfg: EncodeShardsConfig) -> None:
    """Main process only: clear the directory on --overwrite, record the identity, drop the old manifest (a crash
    from here on leaves no manifest, so readers see an unfinished encode)."""
    out.mkdir(parents=True, exist_ok=True)
    remove_temp_files(out, (MANIFEST, IDENTITY))  # what a killed writer (SIGKILL skips the cleanup) left behind
    for split in SPLITS if cfg.overwrite else ():
        for path in list_shards(out, split):
            path.unlink()
    if cfg.overwrite:
        (out / IDENTITY).unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    if not (out / IDENTITY).is_file():
        write_json_atomic(out / IDENTITY, {**identity, "settings": to_dict(cfg)})


# --------------------------------------------------------------------------------------- encoding
def encode_shard(model, shard: PendingShard, media: MediaManifest, grid: tuple[int, ...], batch_size: int,
                 device: torch.device, autocast: bool) -> int:
    """Encode one media shard into its token shard (atomic); returns the number of samples."""

    def batches() -> Iterator[list[tuple[torch.Tensor, int, str]]]:
        batch = []
        for key, fields in iter_shard_samples(shard.media_url):
            batch.append(decode_sample(shard.media_url, key, fields, media.spec, media.field_name,
                                       len(media.class_names), rng=None))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def samples() -> Iterator[TokenSample]:
        for batch in batches():
            x = torch.stack([x for x, _, _ in batch]).to(device)  # (B, C, *S)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                codes = model.encode(x).cpu()  # (B, *grid) int64
            for (_, label, key), c in zip(batch, codes):
                yield TokenSample(key, c, label)

    return write_token_shard(shard.token_path, samples(), model.quantizer.num_codes, grid)


def finish(out: Path, data: str, splits: tuple[str, ...], media: MediaManifest, identity: dict[str, str],
           quantizer: str, num_codes: int, grid: tuple[int, ...], downsample_factor: int,
           cfg: EncodeShardsConfig) -> TokenManifest:
    """Check that every split is complete (same shards as the media, same sample count) and write the manifest,
    with the media's timing (`media_timing`: for audio the sample rate, the hop and tokens per second)."""
    counts, names = {}, {}
    for split in SPLITS:
        token_paths = list_shards(out, split)
        if split not in splits and not token_paths:
            continue
        media_names = media.shard_names.get(split, [])
        missing = sorted(set(media_names) - {p.name for p in token_paths})
        extra = sorted({p.name for p in token_paths} - set(media_names))
        if missing or extra:
            raise ManifestError(f"{out}: {split} token shards do not match the media shards of {data} (missing "
                                f"{missing[:3]}, extra {extra[:3]}); rerun `python -m pipelines.encode_shards "
                                f"--data={data} --tokenizer={cfg.tokenizer} --out={out} --splits={','.join(SPLITS)}`")
        counts[split] = sum(count_samples(p, ENCODE_HINT) for p in token_paths)
        names[split] = media_names  # each token shard has its media shard's name
        if counts[split] != media.counts.get(split, 0):
            raise ManifestError(f"{out}: {counts[split]} {split} token samples but {file_url(data, MANIFEST)} lists "
                                f"{media.counts.get(split, 0)}; {_rerun_hint(cfg)}")
    manifest = TokenManifest(quantizer=quantizer, num_codes=num_codes, grid=list(grid), counts=counts,
                             class_names=list(media.class_names), shards={s: len(n) for s, n in names.items()},
                             shard_names=names,
                             media=media_timing(media.spec, downsample_factor), **identity)
    manifest.save(out)
    return manifest


# ---------------------------------------------------------------------------------------------- main
def main(cfg: EncodeShardsConfig) -> TokenManifest:
    splits = cfg.splits
    if not splits:
        raise ConfigError(f"--splits is empty: give a subset of {','.join(SPLITS)}")
    data, out = cfg.data, Path(cfg.out)
    # The Accelerator gives ranks and barriers only. cpu=True on a machine without CUDA, else accelerate ignores
    # LOCAL_RANK/WORLD_SIZE there and every launched process would think it is the only one. The device and the
    # autocast are chosen here, so --device=cpu also works in a process whose accelerate state points at a GPU.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = resolve_device(cfg.device, accelerator.local_process_index)
    autocast = {"auto": device.type == "cuda", "bf16": True, "no": False}[cfg.mixed_precision]

    # setup: media manifest, tokenizer, and the identity the output directory must match
    media = read_manifest(data)
    check_counts(data, media)  # a truncated shard or hand-edited counts: refused before encoding, not after
    model, ckpt = load_tokenizer(cfg.tokenizer, device)
    tok_cfg = load_config(ckpt)["config"]
    spec = media.spec
    if (tok_cfg["dims"], tok_cfg["in_channels"]) != (spec.dims, spec.channels):
        raise UserError(f"{ckpt} is a tokenizer for dims={tok_cfg['dims']}, in_channels={tok_cfg['in_channels']} "
                        f"but {data} holds {spec.modality} (dims={spec.dims}, channels={spec.channels}); train one "
                        f"on these shards: `python -m pipelines.train_tokenizer --data={data} "
                        f"--model.dims={spec.dims} --model.in_channels={spec.channels}`")
    grid = model.grid_shape(spec.input_shape[1:])  # a sample (C, *S) -> its code grid from S
    identity = {"tokenizer_sha256": weights_sha256(ckpt), "source_manifest_sha256": manifest_sha256(data)}

    # output directory: every process checks (read-only, so all raise alike), then the main process prepares it
    if not cfg.overwrite:
        check_out_dir(out, identity, cfg)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prepare_out_dir(out, identity, cfg)
    accelerator.wait_for_everyone()
    pending = [p for p in pending_token_shards(data, out, media.shard_names) if p.split in splits]
    accelerator.wait_for_everyone()  # everyone has listed before anyone writes, so pending[i::N] is one partition
    mine = pending[accelerator.process_index :: accelerator.num_processes]
    accelerator.print(f"encode_shards: {len(pending)} of {sum(media.shards.get(s, 0) for s in splits)} shards to "
                      f"encode with {ckpt} (grid {list(grid)}, K={model.quantizer.num_codes}) on "
                      f"{accelerator.num_processes} process(es), {device}" + (", bf16" if autocast else ""))

    # encode: one token shard per media shard
    start, done = time.perf_counter(), 0
    for shard in mine:
        t0 = time.perf_counter()
        n = encode_shard(model, shard, media, grid, cfg.batch_size, device, autocast)
        done += n
        print(f"encode_shards[{accelerator.process_index}]: {shard.token_path.name} {n} samples "
              f"({n / (time.perf_counter() - t0):.0f}/s)", flush=True)
    elapsed = time.perf_counter() - start
    if mine:
        print(f"encode_shards[{accelerator.process_index}]: {done} samples in {elapsed:.1f}s "
              f"({done / max(elapsed, 1e-9):.0f} samples/s)", flush=True)
    accelerator.wait_for_everyone()

    # manifest, last
    if accelerator.is_main_process:
        manifest = finish(out, data, splits, media, identity, tok_cfg["quantizer"], model.quantizer.num_codes, grid,
                          model.downsample_factor, cfg)
        accelerator.print(f"encode_shards: {manifest.counts} samples, {manifest.shards} shards, "
                          f"seq_len {math.prod(grid)} ({manifest.dtype})"
                          + (f", {manifest.media['tokens_per_second']:g} tokens/s" if spec.modality == "audio" else "")
                          + f" -> {out / MANIFEST}; next: train the prior "
                          f"on {out} (`python -m pipelines.train_prior`)")
    accelerator.wait_for_everyone()
    return TokenManifest.load(out)


if __name__ == "__main__":
    run(main, EncodeShardsConfig)
