"""Reconstruction metrics of a tokenizer: per-image PSNR/SSIM, L1, codebook utilisation, and the recon grid.

Used by the training loop's evaluation, `python -m pipelines.reconstruct` and `python -m pipelines.evaluate`.

`val/utilisation` and `val/perplexity` are over the *whole* val split (one pass, every sample once), always next to
`val/tokens`, the number of tokens they were counted on. `reconstruction_metrics` is also the training loop's
evaluation, so both report the same numbers the same way.

A val split is often too small for utilisation: 177 digits x 16 tokens = 2,832 tokens can touch at most 69% of
K = 4,096 codes, so "utilisation vs K" would measure the sample size. `codebook_usage` therefore encodes the
*train* split too (encoder + quantizer only) and reports `usage/utilisation`, `usage/perplexity`, `usage/tokens`,
`usage/num_codes`, `usage/max_utilisation` (= min(1, tokens / K), the ceiling the token count allows) and a note
when K exceeds the token count (`--usage_split`, used by `reconstruct` and `evaluate`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torchvision.utils import save_image

from pipelines.metrics.image import from_model_range, psnr, ssim
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
    metrics = {"val/recon_l1": float(sums[0]) / n, "val/samples": n, **usage_metrics(usage, "val/")}
    if first is not None and first[0].dim() == 4:
        metrics["val/psnr"] = float(sums[1]) / n
        metrics["val/ssim"] = float(sums[2]) / n
        if grid_path is not None and (accelerator is None or accelerator.is_main_process):
            save_grid(first[0], first[1], grid_path)
    return metrics


def usage_metrics(usage: CodebookUsage, prefix: str) -> dict[str, float]:
    """Utilisation next to the token count it was measured on: with fewer tokens than codes it cannot reach 1."""
    tokens = usage.total
    return {f"{prefix}utilisation": usage.utilisation, f"{prefix}tokens": float(tokens),
            f"{prefix}num_codes": float(usage.num_codes),
            f"{prefix}max_utilisation": min(1.0, tokens / usage.num_codes),
            f"{prefix}perplexity": usage.perplexity, f"{prefix}dead_codes": float(usage.dead)}


def usage_note(metrics: dict[str, float], prefix: str) -> str | None:
    """A warning when `<prefix>utilisation` was counted on fewer tokens than there are codes."""
    tokens, k = metrics.get(f"{prefix}tokens"), metrics.get(f"{prefix}num_codes")
    if tokens is None or k is None or tokens >= k:
        return None
    return (f"{prefix}utilisation was counted on {tokens:,.0f} tokens < K = {k:,.0f} codes: it cannot exceed "
            f"{tokens / k:.1%}, whatever the tokenizer")


@torch.no_grad()
def codebook_usage(model, loader, device, prefix: str = "usage/") -> dict[str, float]:
    """Codebook usage over every sample of `loader` (MediaBatch), encoder and quantizer only: a pass over the train
    split costs a fraction of a reconstruction pass and counts many more tokens than the val split holds."""
    model.eval()
    usage = CodebookUsage(model.quantizer.num_codes, device=device)
    for batch in loader:
        usage.update(model.encode(batch.x.to(device)))
    return usage_metrics(usage, prefix)


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
