"""Tokenizer checkpoint + media shards -> reconstruction grid and metrics.json (pipelines/metrics/reconstruction.py).

    python -m pipelines.reconstruct --tokenizer=runs/digits/tokenizer --data=runs/digits/shards --out=runs/digits/recon
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from data.shards import media_loader, write_text_atomic
from pipelines.checkpoint import load_tokenizer
from pipelines.config import parse_config, to_dict
from pipelines.metrics.reconstruction import codebook_usage, reconstruction_metrics, usage_note


@dataclass
class ReconstructConfig:
    tokenizer: str = "runs/digits/tokenizer"  # tokenizer checkpoint or run directory
    data: str = "runs/digits/shards"  # media shard directory
    out: str = "runs/digits/recon"  # where recon.png and metrics.json go
    split: str = "val"  # which split to reconstruct
    usage_split: str = "train"  # split encoded for usage/* (codebook utilisation on many tokens); "" = skip
    batch_size: int = 64  # images per forward
    device: str = "auto"  # auto | cpu | cuda


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = parse_config(ReconstructConfig, argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model, ckpt = load_tokenizer(cfg.tokenizer, device)
    loader = media_loader(cfg.data, cfg.split, cfg.batch_size, train=False)
    out = Path(cfg.out)
    metrics = reconstruction_metrics(model, loader, device, grid_path=out / "recon.png")
    metrics = {k.replace("val/", f"{cfg.split}/"): v for k, v in metrics.items()}
    if cfg.usage_split:
        metrics.update(codebook_usage(model, media_loader(cfg.data, cfg.usage_split, cfg.batch_size, train=False),
                                      device))
    notes = [n for n in (usage_note(metrics, f"{cfg.split}/"), usage_note(metrics, "usage/")) if n]
    record = {"metrics": metrics, "notes": notes, "tokenizer": str(ckpt), "settings": to_dict(cfg)}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "metrics.json", json.dumps(record, indent=2))
    print(json.dumps(metrics, indent=2))
    for n in notes:
        print(f"[reconstruct] {n}")
    return metrics


if __name__ == "__main__":
    main()
