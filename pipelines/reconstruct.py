"""Tokenizer checkpoint + media shards -> recon grid and metrics.json, by the media's modality.

    python -m pipelines.reconstruct --tokenizer=runs/digits/tokenizer --data=runs/digits/shards --out=runs/digits/recon

The metrics (pipelines/metrics/reconstruction.py) are the training loop's evaluation, run over the whole `split`:
L1 and PSNR/SSIM for images, codebook utilisation next to its token count, and usage/* counted over `usage_split`
(encoder only; a val split often holds fewer tokens than K). Audio is what `evaluate` reports, on whole val
utterances (pipelines/metrics/audio_eval.py: SNR, SI-SDR, mel/STFT distance, PESQ, STOI, ViSQOL, V/UV F1, bitrate),
under `recon/`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from data.errors import UserError
from data.files import write_text_atomic
from data.reader import media_loader
from data.shards import check_counts, read_manifest
from pipelines.checkpoint import load_tokenizer
from pipelines.cli import run
from pipelines.config import required, to_dict
from pipelines.device import resolve_device
from pipelines.metrics.audio_eval import AudioEvalConfig, audio_reconstruction
from pipelines.metrics.reconstruction import codebook_usage, reconstruction_metrics, usage_note


@dataclass
class ReconstructConfig:
    tokenizer: str = required()  # tokenizer checkpoint or run directory
    data: str = required()  # media shards: a directory, or (images) an http(s) URL or pipe:...{} (data/shards.py)
    out: str = required()  # where recon.png and metrics.json go
    split: str = "val"  # which split to reconstruct
    usage_split: str = "train"  # split encoded for usage/* (codebook utilisation on many tokens); "" = skip
    batch_size: int = 64  # samples per forward
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    audio: AudioEvalConfig = field(default_factory=AudioEvalConfig)  # audio: speech metrics, CREPE model, clips


def main(cfg: ReconstructConfig) -> dict[str, float]:
    device = resolve_device(cfg.device)
    model, ckpt = load_tokenizer(cfg.tokenizer, device)
    manifest = read_manifest(cfg.data)
    check_counts(cfg.data, manifest)
    modality = manifest.spec.modality
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # its loaders would give each process a share it never combines
        raise UserError("pipelines.reconstruct runs in one process; run it with `python -m`, or use "
                        "`accelerate launch -m pipelines.evaluate`, which shares the work over processes")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if modality == "audio":
        metrics, notes = audio_reconstruction(model, cfg.data, out, cfg.audio, cfg.usage_split, cfg.batch_size, device,
                                              cfg.split)
        return finish(cfg, ckpt, {k.replace("recon/", f"{cfg.split}/"): v for k, v in metrics.items()},
                      [n.replace("recon/", f"{cfg.split}/") for n in notes])
    loader = media_loader(cfg.data, cfg.split, cfg.batch_size, train=False)
    metrics = reconstruction_metrics(model, loader, device, grid_path=out / "recon.png", modality=modality)
    metrics = {k.replace("val/", f"{cfg.split}/"): v for k, v in metrics.items()}
    if cfg.usage_split:
        usage_loader = media_loader(cfg.data, cfg.usage_split, cfg.batch_size, train=False)
        metrics.update(codebook_usage(model, usage_loader, device))
    notes = [n for n in (usage_note(metrics, f"{cfg.split}/"), usage_note(metrics, "usage/")) if n]
    return finish(cfg, ckpt, metrics, notes)


def finish(cfg: ReconstructConfig, ckpt, metrics: dict[str, float], notes: list[str]) -> dict[str, float]:
    out = Path(cfg.out)
    record = {"metrics": metrics, "notes": notes, "tokenizer": str(ckpt), "settings": to_dict(cfg)}
    write_text_atomic(out / "metrics.json", json.dumps(record, indent=2))
    print(json.dumps(metrics, indent=2))
    for n in notes:
        print(f"[reconstruct] {n}")
    return metrics


if __name__ == "__main__":
    run(main, ReconstructConfig)
