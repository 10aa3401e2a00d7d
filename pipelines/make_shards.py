"""Media folder or built-in demo data -> webdataset shards + manifest.json (the first stage).

    python -m pipelines.make_shards --source=digits --out=runs/shards/digits
    python -m pipelines.make_shards --source=photos --size=32 --count=2000
    python -m pipelines.make_shards --source=/data/imagenet/train --size=128 --out=runs/shards/inet
    python -m pipelines.make_shards --source=/data/wavs --modality=audio --sample_rate=24000
    python -m pipelines.make_shards --source=spoken-digits --out=runs/shards/spoken-digits   # needs espeak-ng
    python -m pipelines.make_shards --source=spoken-digit-strings --count=10 --voices=40

Formats, split rule, sample shuffle and resize policy: data/shards.py and data/media.py. Unreadable files
are skipped, logged with the reason and listed in the manifest; a class folder with no readable file is
dropped from the class names; the run fails only when nothing at all is readable.

Interrupted (Ctrl-C, a crash, SIGKILL): manifest.json is written last, so no later stage reads the directory; the
same command again (no --overwrite needed, there is no manifest) writes every shard from the start and removes what
the interrupted run left behind: its temp files and any shard this run does not write.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from data.builtin import BUILTIN_MODALITY, BUILTIN_SOURCES, open_source
from data.errors import MediaError, UserError
from data.media import MediaSpec
from data.shards import MediaManifest, write_media_shards
from pipelines.cli import run
from pipelines.config import ConfigError, required

DEFAULT_SIZE = {"digits": 16, "photos": 32}  # built-ins render small so the CPU demo stays quick
FOLDER_DEFAULT_SIZE = 128  # the paper's ImageNet resolution
SPEECH_SAMPLE_RATE = 16_000  # the spoken built-ins: SC09's rate, and PESQ-wb's
FOLDER_SAMPLE_RATE = 24_000  # the paper's LibriTTS rate


@dataclass
class MakeShardsConfig:
    source: str = required()  # digits | photos | spoken-digits | spoken-digit-strings | /path/to/folder (recursive;
    # label = first-level sub-folder)
    out: str = ""  # output directory; "" = runs/shards/<source name>
    modality: Literal["", "image", "audio"] = ""  # "" = the built-in's own (spoken-* audio), image for a folder
    size: int = 0  # image side in pixels; 0 = digits 16, photos 32, folder 128
    resize: Literal["short_side", "center_crop", "none"] = "short_side"  # shard-time policy, see data/media.py
    sample_rate: int = 0  # audio: resampled to this rate at shard time; 0 = spoken-* 16 kHz, else 24 kHz (paper)
    clip_seconds: float = 1.0  # audio: crop length at read time (paper: 1 s)
    labels: Literal["auto", "none", "subfolder"] = "auto"  # folder: auto = sub-folders when no file sits at the root
    count: int = 0  # 0 = default; photos: random crops (2,000); spoken-digits: takes per voice and digit (1);
    # spoken-digit-strings: strings per voice (3)
    voices: int = 0  # spoken-*: how many of the 148 voices, drawn by --seed (0 = all)
    workers: int = 0  # spoken-*: synthesiser subprocesses at a time (0 = one per core); the bytes do not depend on it
    seed: int = 0  # photos: crop positions; spoken-*: voices drawn, speed/pitch/words of each utterance
    val_fraction: float = 0.1  # expected share of samples in the val split
    split_seed: int = 0  # changes which samples land in val
    shuffle_seed: int = 0  # order samples are written in (shuffled so each shard mixes classes)
    shard_max_count: int = 1_000  # samples per shard at most
    shard_max_mb: int = 256  # payload MB per shard at most
    overwrite: bool = False  # replace an existing shard directory

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:  # 1 and above put every sample in val, leaving nothing to train on
            raise ConfigError(f"--val_fraction={self.val_fraction}: it must be in [0, 1) (0.1 = a tenth of the "
                              "samples in val)")
        for key in ("shard_max_count", "shard_max_mb"):
            if getattr(self, key) < 1:
                raise ConfigError(f"--{key}={getattr(self, key)}: it must be >= 1")


def main(cfg: MakeShardsConfig) -> MediaManifest:
    builtin = cfg.source in BUILTIN_SOURCES
    modality = cfg.modality or (BUILTIN_MODALITY[cfg.source] if builtin else "image")
    size = cfg.size or DEFAULT_SIZE.get(cfg.source, FOLDER_DEFAULT_SIZE)
    speech = builtin and BUILTIN_MODALITY[cfg.source] == "audio"
    sample_rate = cfg.sample_rate or (SPEECH_SAMPLE_RATE if speech else FOLDER_SAMPLE_RATE)
    spec = MediaSpec(modality=modality, size=size, resize=cfg.resize, sample_rate=sample_rate,
                     clip_seconds=cfg.clip_seconds)
    try:  # a missing or empty folder, --labels or --modality that do not fit it: the user's to fix
        source = open_source(cfg.source, modality, size, cfg.count, cfg.seed, cfg.labels, sample_rate=sample_rate,
                             voices=cfg.voices, workers=cfg.workers)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--source={cfg.source}: {e}") from None
    name = cfg.source if builtin else Path(cfg.source).resolve().name
    out = Path(cfg.out or f"runs/shards/{name}")
    print(f"make_shards: {len(source.items)} {modality} items from {source.name} -> {out}")
    try:  # an --out that already holds shards; a source with no readable file at all
        manifest = write_media_shards(source, out, spec, val_fraction=cfg.val_fraction, split_seed=cfg.split_seed,
                                      shuffle_seed=cfg.shuffle_seed, max_count=cfg.shard_max_count,
                                      max_bytes=cfg.shard_max_mb << 20, overwrite=cfg.overwrite)
    except (FileExistsError, MediaError) as e:
        raise UserError(str(e)) from None
    print(f"make_shards: wrote {manifest.counts} samples in {manifest.shards} shards, "
          f"{len(manifest.class_names)} classes ({len(manifest.dropped_classes)} dropped), "
          f"{len(manifest.skipped)} skipped -> {out / 'manifest.json'}")
    return manifest


if __name__ == "__main__":
    run(main, MakeShardsConfig)
