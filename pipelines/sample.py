"""Sample media: prior -> codes -> tokenizer.decode -> files (png | wav, by the media's modality), grids, a manifest.

    python -m pipelines.sample --prior=runs/digits/prior --tokenizer=runs/digits/tokenizer --out=runs/digits/samples
    python -m pipelines.sample ... --num_per_class=100 --classes=3,7 --settings.cfg_scale=2 --settings.top_k=100
    python -m pipelines.sample ... --num=64                  # unconditional: the null class (or a num_classes=0 prior)
    accelerate launch -m pipelines.sample ...                # the plan split over processes (GPUs, or CPU processes)

Writes out/run.json first (the settings the files are made with), out/media/{class}/{index:06d}.{png|wav} (no
{class}/ when unconditional; wav: 16-bit PCM mono), out/grids/{class}.png (the first `grid_per_class` of each class;
audio as log-magnitude spectrograms), out/grid.png (a row of `overview_cols` per class) and, last, out/manifest.json:
both checkpoints + hashes, seed, every setting, the media spec, and per sample path, label, class, seed (audio also
sample_rate, frames, seconds).

main: check the pair -> plan -> check/prepare out -> generate the pending decoder groups -> write
(data.media.to_file_bytes) -> grids -> manifest. The file format (modality; the wav rate) is the media manifest's of
the prior's tokens: `--data`, else the tokenizer's data, else the media timing their token manifest recorded.

Sample i (in output order: class by class, in the order of `classes`) uses seed `seed + i`, and prior/sampling.py
draws each sample's randomness from its own seed, so a sample does not depend on the batch size or its batch-mates.
The decoder runs the fixed groups plan[g * decode_batch:(g + 1) * decode_batch] (its float rounding depends on the
batch shape), so a group is the unit of work: process r of P makes the pending groups r, r + P, ... and every file
has the bytes of a one-process run. Each file is written atomically; a rerun with the same settings (run.json;
the number of processes and batch_size may differ) makes only the groups with a missing file, so a killed run
(even SIGKILL) finishes with exactly the files an uninterrupted run writes. Other settings are refused, naming the
setting, unless --overwrite=true. After every process finished, the main process alone draws the grids from the
files and writes the manifest.
The prior records which tokenizer made its training tokens (train_config.token_manifest); a tokenizer with another
hash, K, quantizer or grid is refused, since its codes would mean different media.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from accelerate import Accelerator

from data.errors import UserError
from data.files import TEMP_MARK, write_bytes_atomic, write_json_atomic, write_text_atomic
from data.media import MediaSpec, modality_of, to_file_bytes
from data.shards import MANIFEST, file_url, is_remote, manifest_sha256, read_manifest
from pipelines.checkpoint import (PRIOR_HINT, checkpoint_hash, load_config, load_prior, load_tokenizer,
                                  weights_sha256)
from pipelines.cli import run
from pipelines.config import ConfigError, required, to_dict
from pipelines.device import resolve_device
from pipelines.metrics.grids import class_grids, thumbnails, write_png
from pipelines.metrics.inputs import SAMPLE_READERS, from_integers
from prior import Prior, SampleSettings, sample

SAMPLES_FORMAT = "simvq-samples"
SAMPLES_VERSION = 2  # 2: files under media/ in the modality's format, listed as "samples"; 1: images/*.png, "images"
RUN_SETTINGS = "run.json"  # written when a run starts: what decides the files' bytes (a rerun must match it)


class IncompatibleCheckpoints(UserError, ValueError):
    """A prior and a tokenizer that do not belong together: the prior's codes would decode to the wrong media."""


class SamplesExist(UserError, FileExistsError):
    """`out` already holds the samples of an earlier run."""


@dataclass
class SampleConfig:
    prior: str = required()  # prior checkpoint or run directory (newest checkpoint)
    tokenizer: str = required()  # tokenizer checkpoint or run directory; must be the prior's tokenizer
    out: str = required()  # output directory (media/, grids/, grid.png, manifest.json)
    data: str = ""  # media shards the prior's tokens came from (file format, wav rate); "" = the tokenizer's data
    num_per_class: int = 10  # samples per class; an unconditional prior counts as one class
    num: int = 0  # > 0: that many unconditional samples (null class) instead of num_per_class per class
    classes: list[str] = field(default_factory=list)  # class names (or indices) to sample; empty = all
    batch_size: int = 64  # samples per prior forward (per process); does not change the samples
    decode_batch: int = 64  # samples per decoder forward; fixed, so outputs never depend on batch_size or processes
    seed: int = 0  # sample i uses seed + i
    grid_per_class: int = 64  # samples in each out/grids/{class}.png
    overview_cols: int = 10  # samples per class row in out/grid.png
    overwrite: bool = False  # replace the samples in `out` (else a run with the same settings finishes them)
    device: str = "auto"  # auto = this process's GPU when available, else cpu; or e.g. cpu, cuda:1
    settings: SampleSettings = field(default_factory=SampleSettings)  # temperature, top-k/p, min-p, CFG, kv cache


# ---------------------------------------------------------------------------------------- checkpoints and media
def identity(ckpt: Path) -> dict:  # what the manifest records of a checkpoint
    return {"path": str(ckpt), "checkpoint_sha256": checkpoint_hash(ckpt), "weights_sha256": weights_sha256(ckpt)}


def check_pair(prior: Prior, prior_config: dict, prior_ckpt: Path, tokenizer_ckpt: Path) -> dict:
    """Refuse a tokenizer other than the one whose codes trained the prior; returns the prior's token manifest."""
    recorded = prior_config.get("train_config", {}).get("token_manifest")
    if recorded is None:
        raise IncompatibleCheckpoints(f"{prior_ckpt}/config.json records no token manifest, so the tokenizer it "
                                      f"was trained for is unknown; {PRIOR_HINT}")
    if not recorded.get("tokenizer_sha256"):
        raise IncompatibleCheckpoints(f"prior {prior_ckpt} was trained on codes packed without a tokenizer "
                                      f"(pipelines.pack_tokens without --tokenizer), so no tokenizer is known to decode "
                                      f"them; re-pack the codes with --tokenizer=<the checkpoint that made them> and "
                                      f"retrain the prior")
    tok = load_config(tokenizer_ckpt)["config"]
    actual = {"tokenizer_sha256": weights_sha256(tokenizer_ckpt), "num_codes": tok["num_codes"],
              "quantizer": tok["quantizer"]}
    diffs = [f"{k}: prior trained on {recorded[k]!r}, tokenizer has {v!r}" for k, v in actual.items()
             if recorded[k] != v]
    grid_shape = [int(g) for g in recorded["grid"]]
    if len(grid_shape) != tok["dims"]:
        diffs.append(f"grid: prior trained on a {len(grid_shape)}-d grid {grid_shape}, tokenizer is {tok['dims']}-d")
    if math.prod(grid_shape) != prior.cfg.seq_len or recorded["num_codes"] != prior.cfg.num_codes:
        diffs.append(f"prior model (K={prior.cfg.num_codes}, seq_len={prior.cfg.seq_len}) disagrees with its own "
                     f"token manifest (K={recorded['num_codes']}, grid={grid_shape})")
    if diffs:
        raise IncompatibleCheckpoints(
            f"prior {prior_ckpt} and tokenizer {tokenizer_ckpt} do not belong together: " + "; ".join(diffs)
            + ". Pass the tokenizer that encoded the prior's token shards, or encode with this one (`python -m "
            "pipelines.encode_shards`) and retrain the prior (`python -m pipelines.train_prior`)")
    return recorded


def media_spec(data: str, tokenizer_ckpt: Path, source_sha: str | None, timing: dict | None = None
               ) -> tuple[MediaSpec, str]:
    """(MediaSpec of the files, its origin): `data`'s manifest, else the tokenizer's training data's if the prior's
    tokens came from it, else the timing the token manifest recorded (`timing`, data.tokens.media_timing: the wav
    rate), else the registry's defaults for the tokenizer's dims and channels (with a note)."""
    tok = load_config(tokenizer_ckpt)
    shards = data or tok.get("train_config", {}).get("data", "")
    manifest = file_url(shards, MANIFEST) if shards else ""
    if shards and (data or is_remote(shards) or Path(manifest).is_file()):
        spec = read_manifest(shards).spec  # a --data without a manifest: ManifestError saying what to run
        if manifest_sha256(shards) == source_sha:
            return spec, manifest
        if data:
            raise UserError(f"--data={data}: {manifest} is not the manifest the prior's tokens were made from "
                            f"(sha256 {source_sha}); pass those media shards")
    dims, channels = tok["config"]["dims"], tok["config"]["in_channels"]
    modality = modality_of(dims, channels)
    if modality is None:
        raise UserError(f"{tokenizer_ckpt}: no media modality has dims={dims}, channels={channels}; pass --data")
    if timing and timing.get("modality") == modality == "audio":
        spec = MediaSpec(modality="audio", sample_rate=int(timing["sample_rate"]),
                         clip_seconds=float(timing.get("clip_seconds", 1.0)))
        return spec, "the prior's token manifest (media timing)"
    print(f"sample: no media manifest of the prior's data found: writing {modality} files with default settings; "
          f"pass --data=<media shards> to use theirs")
    return MediaSpec(modality=modality), f"defaults for {modality} (no media manifest found)"


# ---------------------------------------------------------------------------------------- plan
class Item(NamedTuple):
    label: int | None  # class index, None = the null class (unconditional)
    name: str | None  # class name, None when unconditional
    index: int  # position within its class: the file name
    seed: int


def class_dirname(name: str) -> str:
    safe = name.replace(os.sep, "_").replace("/", "_").strip()
    return safe if safe and safe not in (".", "..") else "_"


def resolve_classes(wanted: list[str], names: list[str]) -> list[int]:
    """Class indices for names (or integer indices) in `wanted`; empty = all classes."""
    def index(w: str) -> int:
        if w in names:
            return names.index(w)
        if w.lstrip("-").isdigit() and 0 <= int(w) < len(names):
            return int(w)
        raise ConfigError(f"--classes: {w!r} is neither a class name nor an index of {names}")
    return [index(w) for w in wanted] if wanted else list(range(len(names)))


def make_plan(cfg: SampleConfig, conditional: bool, names: list[str]) -> list[Item]:
    """One item per sample, in output order (class by class); sample i gets seed + i."""
    if cfg.batch_size < 1 or cfg.decode_batch < 1:
        raise ConfigError(f"--batch_size and --decode_batch must be >= 1 (got {cfg.batch_size}, {cfg.decode_batch})")
    if cfg.num > 0:
        classes = [(None, None, cfg.num)]
    elif cfg.num_per_class < 1:
        raise ConfigError(f"--num_per_class must be >= 1 (got {cfg.num_per_class}), or pass --num=N")
    elif not conditional:  # one "class": the same settings serve labelled and unlabelled data (compare)
        classes = [(None, None, cfg.num_per_class)]
    else:
        classes = [(c, names[c], cfg.num_per_class) for c in resolve_classes(cfg.classes, names)]
    plan, per_class = [], {}  # per_class: how many items each class has so far (--classes may repeat one)
    for label, name, n in classes:
        for _ in range(n):
            per_class[name] = per_class.get(name, -1) + 1
            plan.append(Item(label, name, per_class[name], cfg.seed + len(plan)))
    return plan


def guidance(settings: SampleSettings, conditional: bool, prior_ckpt: Path) -> SampleSettings:
    """Guidance needs a class to move towards: an unconditional prior samples with cfg_scale 1 (recorded)."""
    if conditional or settings.cfg_scale == 1.0:
        return settings
    print(f"sample: {prior_ckpt} is unconditional, so cfg_scale={settings.cfg_scale} becomes 1 (no guidance)")
    return dataclasses.replace(settings, cfg_scale=1.0)


# ---------------------------------------------------------------------------------------- generate
@torch.no_grad()
def sample_codes(prior: Prior, labels: torch.Tensor | None, settings: SampleSettings, seeds: Sequence[int],
                 grid_shape: Sequence[int], num_codes: int) -> torch.Tensor:
    """Codes (B, *grid) int64 for B = len(seeds), checked to lie in the tokenizer's [0, num_codes)."""
    device = next(prior.parameters()).device
    # bf16 for the transformer trunk; Prior.step and sampling keep the logits, CFG and filters in fp32 themselves
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        codes = sample(prior, None if labels is None else labels.to(device), math.prod(grid_shape), settings, seeds)
    if codes.min() < 0 or codes.max() >= num_codes:
        raise IncompatibleCheckpoints(f"the prior sampled codes in [{int(codes.min())}, {int(codes.max())}] but the "
                                      f"tokenizer has K={num_codes}: they were not trained together")
    return codes.view(len(seeds), *grid_shape)  # (B, L) -> (B, *grid): raster order, as data/tokens.py stores them


@torch.no_grad()
def generate(prior: Prior, tokenizer: torch.nn.Module, labels: torch.Tensor | None, settings: SampleSettings,
             seeds: Sequence[int], grid: Sequence[int], batch_size: int = 0, decode_batch: int = 64) -> torch.Tensor:
    """len(seeds) samples -> decoder output (N, C, *S) in [-1, 1] on the CPU; `labels` (N,) or None (null class).

    The prior runs `batch_size` samples at a time (0 = all; bf16 autocast on CUDA, head/CFG/filters in fp32); its
    codes depend only on (seed, label). The decoder (fp32) runs fixed groups of `decode_batch` from the first sample:
    conv kernels round differently for other batch shapes (~3e-6 on CPU, enough to flip a uint8 now and then)."""
    n = len(seeds)
    batch_size = batch_size or n
    codes = torch.cat([
        sample_codes(prior, None if labels is None else labels[i:i + batch_size], settings, seeds[i:i + batch_size],
                     grid, tokenizer.quantizer.num_codes).cpu()
        for i in range(0, n, batch_size)])  # (N, *grid)
    tok_device = next(tokenizer.parameters()).device
    return torch.cat([tokenizer.decode(codes[i:i + decode_batch].to(tok_device)).float().clamp(-1, 1).cpu()
                      for i in range(0, n, decode_batch)])  # (N, C, *S)


def pending_groups(plan: list[Item], out: Path, spec: MediaSpec, decode_batch: int) -> list[list[Item]]:
    """The decoder groups plan[i:i + decode_batch] with a sample file missing. A group is the unit of work: its
    samples' bytes depend on the group they are decoded in, so a group with a missing file is made whole again."""
    groups = [plan[i:i + decode_batch] for i in range(0, len(plan), decode_batch)]
    return [g for g in groups if not all((out / item_path(item, spec)).is_file() for item in g)]


def chunks(groups: list[list[Item]], batch_size: int, decode_batch: int) -> list[list[Item]]:
    """Whole decoder groups joined into chunks of at least batch_size samples (the prior's batches): within a chunk
    `generate` decodes the same groups, since only the plan's last group can be short and it comes last."""
    per_chunk = -(-max(batch_size, decode_batch) // decode_batch)
    return [[item for g in groups[i:i + per_chunk] for item in g] for i in range(0, len(groups), per_chunk)]


# ---------------------------------------------------------------------------------------- write
def setting_differences(recorded: dict, current: dict, prefix: str = "") -> list[str]:
    """`name: recorded -> current` for every (nested, dotted) setting that differs."""
    diffs = []
    for key in sorted(set(recorded) | set(current)):
        a, b = recorded.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += setting_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return diffs


def check_out(out: Path, run: dict) -> None:
    """Refuse an `out` holding samples of other settings, or of unknown ones. Read-only: every process raises alike."""
    fix = "pass --overwrite=true to replace them, or choose another --out"
    if (out / RUN_SETTINGS).is_file():
        diffs = setting_differences(json.loads((out / RUN_SETTINGS).read_text()), run)
        if diffs:
            raise SamplesExist(f"{out} holds samples made with other settings ({'; '.join(diffs)}; recorded in "
                               f"{out / RUN_SETTINGS}): rerun with those settings to finish them, or {fix}")
    elif (out / "manifest.json").exists() or any(p.is_file() for p in (out / "media").rglob("*")):
        raise SamplesExist(f"{out} already holds samples, made without {RUN_SETTINGS} (their settings are "
                           f"unknown): {fix}")


def prepare_out(out: Path, run: dict, overwrite: bool) -> None:
    """Main process only: clear `out` on --overwrite, drop the manifest (from here on an interrupted run leaves
    none) and the temp files of a killed writer, record the run's settings."""
    if overwrite:
        (out / RUN_SETTINGS).unlink(missing_ok=True)
        for old in (out / "media", out / "images", out / "grids"):  # images/: SAMPLES_VERSION 1's folder
            shutil.rmtree(old, ignore_errors=True)
    (out / "manifest.json").unlink(missing_ok=True)
    for temp in (out / "media").rglob(f".*{TEMP_MARK}*"):  # SIGKILL skips atomic_path's cleanup
        temp.unlink()
    if not (out / RUN_SETTINGS).is_file():
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_SETTINGS, run)


def item_path(item: Item, spec: MediaSpec) -> Path:
    folder = Path("media") if item.name is None else Path("media") / class_dirname(item.name)
    return folder / f"{item.index:06d}.{spec.extension}"


def sample_record(item: Item, spec: MediaSpec, shape: Sequence[int]) -> dict:
    """One sample in the manifest: path, label, class, seed; for audio also what a user of an audio codec's outputs
    (DAC, Vocos, EnCodec) looks for beside a wav file: its rate, length in samples and duration."""
    record = {"path": item_path(item, spec).as_posix(), "label": -1 if item.label is None else item.label,
              "class": item.name, "seed": item.seed}
    if spec.modality == "audio":
        record.update(sample_rate=spec.sample_rate, frames=shape[-1], seconds=shape[-1] / spec.sample_rate)
    return record


def write_samples(out: Path, items: list[Item], x: torch.Tensor, spec: MediaSpec) -> None:
    """One file per sample (x: (N, C, *S) in [-1, 1]) through the media registry's writer, each written whole or not
    at all; a file already there (a resumed group) is kept: it holds the same bytes."""
    for item, one in zip(items, x):
        path = out / item_path(item, spec)
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, to_file_bytes(one, spec))


def read_sample(out: Path, item: Item, spec: MediaSpec) -> torch.Tensor:
    """A written sample back in [-1, 1], (C, *S): what its file stores."""
    return from_integers(SAMPLE_READERS[spec.extension](out / item_path(item, spec)))


# ---------------------------------------------------------------------------------------- grids
def write_grids(out: Path, plan: list[Item], spec: MediaSpec, cfg: SampleConfig) -> None:
    """grids/{class}.png and grid.png of each class's first samples, drawn from their files, so a resumed or sharded
    run draws the grids of an uninterrupted one."""
    keep = max(cfg.grid_per_class, cfg.overview_cols if cfg.num == 0 else cfg.overview_cols ** 2)
    shown: dict[str | None, list[torch.Tensor]] = {}  # class name (None: unconditional) -> its first thumbnails
    for item in plan:
        if item.index < keep:
            shown.setdefault(item.name, []).append(thumbnails(read_sample(out, item, spec)[None], spec.modality)[0])
    per_class, overview = class_grids(shown, cfg.grid_per_class, cfg.overview_cols, square=cfg.num > 0)
    for name, image in per_class.items():
        write_png(image, out / "grids" / f"{class_dirname(name)}.png")
    write_png(overview, out / "grid.png")


# ---------------------------------------------------------------------------------------- main
def run_settings(cfg: SampleConfig, settings: SampleSettings, plan: list[Item], names: list[str], spec: MediaSpec,
                 device: torch.device, prior_ckpt: Path, tokenizer_ckpt: Path) -> dict:
    """What decides the files' bytes, recorded in run.json: a rerun finishes the run only with all of it equal. Not
    batch_size and not the number of processes: they change no sample."""
    return {"prior_weights_sha256": weights_sha256(prior_ckpt),
            "tokenizer_weights_sha256": weights_sha256(tokenizer_ckpt),
            "seed": cfg.seed, "num": cfg.num, "num_per_class": cfg.num_per_class,
            "classes": [names[c] for c in resolve_classes(cfg.classes, names)] if plan[0].label is not None else [],
            "decode_batch": cfg.decode_batch, "settings": to_dict(settings), "media": dataclasses.asdict(spec),
            "device": device.type, "prior_precision": "bf16" if device.type == "cuda" else "fp32"}


def main(cfg: SampleConfig) -> dict:
    # The Accelerator gives ranks and barriers only (cpu=True without CUDA, as in pipelines/encode_shards.py).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = resolve_device(cfg.device, accelerator.local_process_index)
    prior, prior_ckpt, prior_config = load_prior(cfg.prior, device)
    tokenizer, tokenizer_ckpt = load_tokenizer(cfg.tokenizer, device)
    recorded = check_pair(prior, prior_config, prior_ckpt, tokenizer_ckpt)
    spec, spec_source = media_spec(cfg.data, tokenizer_ckpt, recorded.get("source_manifest_sha256"),
                                   recorded.get("media"))
    grid_shape, names = [int(g) for g in recorded["grid"]], list(recorded["class_names"])
    plan = make_plan(cfg, prior.conditional, names)
    settings = guidance(cfg.settings, prior.conditional, prior_ckpt)
    out = Path(cfg.out)
    run = json.loads(json.dumps(run_settings(cfg, settings, plan, names, spec, device, prior_ckpt, tokenizer_ckpt)))

    # the output directory: every process checks (read-only), then the main process prepares it
    if not cfg.overwrite:
        check_out(out, run)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prepare_out(out, run, cfg.overwrite)
    accelerator.wait_for_everyone()
    pending = pending_groups(plan, out, spec, cfg.decode_batch)
    accelerator.wait_for_everyone()  # everyone has listed before anyone writes, so pending[i::P] is one partition
    mine = pending[accelerator.process_index::accelerator.num_processes]
    todo = sum(len(g) for g in pending)
    accelerator.print(f"sample: {todo} of {len(plan)} samples to make ({len(plan) - todo} already in {out}/media) on "
                      f"{accelerator.num_processes} process(es), {device}")

    start, made = time.perf_counter(), 0
    for chunk in chunks(mine, cfg.batch_size, cfg.decode_batch):
        labels = None if chunk[0].label is None else torch.tensor([item.label for item in chunk])
        x = generate(prior, tokenizer, labels, settings, [item.seed for item in chunk], grid_shape,
                     batch_size=cfg.batch_size, decode_batch=cfg.decode_batch)  # (n, C, *S) in [-1, 1]
        write_samples(out, chunk, x, spec)
        made += len(chunk)
    if mine:
        print(f"sample[{accelerator.process_index}]: {made} samples in {time.perf_counter() - start:.1f}s", flush=True)
    accelerator.wait_for_everyone()

    # grids and manifest, last, by the main process from the files every process wrote
    if accelerator.is_main_process:
        missing = [item_path(item, spec) for item in plan if not (out / item_path(item, spec)).is_file()]
        if missing:
            raise RuntimeError(f"sample: {len(missing)} sample files missing after every process finished, e.g. "
                               f"{out / missing[0]}")
        shape = list(read_sample(out, plan[0], spec).shape)  # one sample: (C, *S)
        write_grids(out, plan, spec, cfg)
        manifest = {
            "format": SAMPLES_FORMAT, "version": SAMPLES_VERSION,
            "prior": {**identity(prior_ckpt), "step": prior_config.get("step")},
            "tokenizer": identity(tokenizer_ckpt),
            "source_manifest_sha256": recorded.get("source_manifest_sha256"),  # the media of the prior's tokens
            "seed": cfg.seed, "settings": to_dict(settings), "count": len(plan),
            "conditional": plan[0].label is not None, "num_per_class": cfg.num_per_class if cfg.num == 0 else 0,
            "classes": [n for n in dict.fromkeys(item.name for item in plan) if n is not None],
            "class_names": names, "grid": grid_shape, "shape": shape,
            "modality": spec.modality, "extension": spec.extension, "media": dataclasses.asdict(spec),
            "media_from": spec_source,
            "device": str(device), "prior_precision": run["prior_precision"],
            "token_manifest": recorded,
            "samples": [sample_record(item, spec, shape) for item in plan],
        }
        write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        print(f"wrote {len(plan)} samples to {out}/media, {out}/grid.png and {out}/manifest.json")
    accelerator.wait_for_everyone()
    manifest = json.loads((out / "manifest.json").read_text())
    return {k: v for k, v in manifest.items() if k != "samples"}  # the per-sample list stays on disk


if __name__ == "__main__":
    run(main, SampleConfig)
