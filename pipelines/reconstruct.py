"""Tokenizer checkpoint + val shards -> reconstruction grid, per-image PSNR/SSIM, codebook utilisation.

    python -m pipelines.reconstruct --tokenizer=runs/digits/tokenizer --data=runs/digits/shards --out=runs/digits/recon

Utilisation and perplexity are over the *whole* val split (one pass, every sample once), as the paper reports them.
`reconstruction_metrics` is also the training loop's evaluation, so both report the same numbers the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torchvision.utils import save_image

from data.shards import media_loader, write_text_atomic
from pipelines.checkpoint import load_tokenizer
from pipelines.config import parse_config, to_dict
from pipelines.image_metrics import from_model_range, psnr, ssim
from tokenizer.quantizers import CodebookUsage


@torch.no_grad()
def reconstruction_metrics(model, loader, device, accelerator=None, max_batches: int = 0,
                           grid_path: Path | None = None, grid_count: int = 16,
                           on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> dict[str, float]:
    """One pass over `loader` (MediaBatch) with `model` (a VQAutoencoder): mean per-image PSNR/SSIM (images), L1,
    and codebook usage. Under several processes the sums are reduced across them before dividing. `on_batch(x, x_hat)`
    sees every batch (e.g. to collect images for rFID)."""
    model.eval()
    usage = CodebookUsage(model.quantizer.num_codes, device=device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # l1, psnr, ssim, count
    first = None
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        x = batch.x.to(device)
        out = model(x)
        x_hat = out.x_hat.float().clamp(-1, 1)
        usage.update(out.codes)
        sums[0] += (x_hat - x).abs().flatten(1).mean(1).sum()
        if x.dim() == 4:  # images: PSNR/SSIM on [0, 1], per image then averaged (not the batch-PSNR bug)
            a, b = from_model_range(x), from_model_range(x_hat)
            sums[1] += psnr(a, b).sum()
            sums[2] += ssim(a, b).sum()
        sums[3] += x.shape[0]
        if on_batch is not None:
            on_batch(x, x_hat)
        if first is None:
            first = (x[:grid_count].cpu(), x_hat[:grid_count].cpu())
    if accelerator is not None:
        sums = accelerator.reduce(sums, "sum")
        usage.counts = accelerator.reduce(usage.counts, "sum")
    n = max(1.0, float(sums[3]))
    metrics = {"val/recon_l1": float(sums[0]) / n, "val/samples": n, **usage.summary("val/")}
    if first is not None and first[0].dim() == 4:
        metrics["val/psnr"] = float(sums[1]) / n
        metrics["val/ssim"] = float(sums[2]) / n
        if grid_path is not None and (accelerator is None or accelerator.is_main_process):
            save_grid(first[0], first[1], grid_path)
    return metrics


def save_grid(x: torch.Tensor, x_hat: torch.Tensor, path: Path) -> None:
    """Originals on the odd rows, reconstructions under them, written atomically."""
    n = x.shape[0]
    cols = min(8, n)
    rows = []
    for r in range(0, n, cols):
        rows += [x[r:r + cols], x_hat[r:r + cols]]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_image(torch.cat(rows) * 0.5 + 0.5, tmp, nrow=cols, padding=1)
    tmp.replace(path)


@dataclass
class ReconstructConfig:
    tokenizer: str = "runs/digits/tokenizer"  # tokenizer checkpoint or run directory
    data: str = "runs/digits/shards"  # media shard directory
    out: str = "runs/digits/recon"  # where recon.png and metrics.json go
    split: str = "val"  # which split to reconstruct
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
    record = {"metrics": metrics, "tokenizer": str(ckpt), "settings": to_dict(cfg)}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "metrics.json", json.dumps(record, indent=2))
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
