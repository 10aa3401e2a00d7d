"""Reconstruction metrics of a tokenizer, per modality: L1 always, images PSNR/SSIM (per image, then averaged),
audio SNR (per clip); codebook utilisation; the recon grid.

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

from pipelines.metrics.audio import snr
from pipelines.metrics.grids import recon_grid, write_png
from pipelines.metrics.image import from_model_range, psnr, ssim
from pipelines.metrics.shares import reduce_sum
from tokenizer.quantizers import CodebookUsage


def _image_psnr(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return psnr(from_model_range(x), from_model_range(x_hat))  # on [0, 1], per image (not the batch-PSNR bug)


def _image_ssim(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return ssim(from_model_range(x), from_model_range(x_hat))


# Per modality (data.media.MODALITIES' names): metric name -> (x, x_hat) in [-1, 1] -> (B,) one value per sample.
# Reported as val/<name>, the mean over samples; val/recon_l1 is computed for every modality.
PER_SAMPLE_METRICS: dict[str, dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]] = {
    "image": {"psnr": _image_psnr, "ssim": _image_ssim},
    "audio": {"snr": snr},
}


@torch.no_grad()
def reconstruction_metrics(model, loader, device, accelerator=None, max_batches: int = 0,
                           grid_path: Path | None = None, grid_count: int = 16,
                           on_batch: Callable[[torch.Tensor, torch.Tensor], None] | None = None, *,
                           modality: str) -> dict[str, float]:
    """One pass over `loader` (MediaBatch) with `model` (a VQAutoencoder): mean L1, the means of `modality`'s
    PER_SAMPLE_METRICS, and codebook usage. Under several processes the sums are reduced across them before
    dividing. `on_batch(x, x_hat)` sees every batch (e.g. to collect images for rFID); `grid_path` gets the
    recon grid of the first `grid_count` samples (pipelines/metrics/grids.py)."""
    if modality not in PER_SAMPLE_METRICS:
        raise KeyError(f"no reconstruction metrics for modality {modality!r} ({sorted(PER_SAMPLE_METRICS)})")
    per_sample = PER_SAMPLE_METRICS[modality]
    model.eval()
    usage = CodebookUsage(model.quantizer.num_codes, device=device)
    sums = torch.zeros(2 + len(per_sample), dtype=torch.float64, device=device)  # count, l1, *per_sample
    first = None
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        x = batch.x.to(device)
        out = model(x)
        x_hat = out.x_hat.float().clamp(-1, 1)
        usage.update(out.codes)
        sums[0] += x.shape[0]
        sums[1] += (x_hat - x).abs().flatten(1).mean(1).sum()
        for j, fn in enumerate(per_sample.values()):
            sums[2 + j] += fn(x, x_hat).sum()
        if on_batch is not None:
            on_batch(x, x_hat)
        if first is None:
            first = (x[:grid_count].cpu(), x_hat[:grid_count].cpu())
    if accelerator is not None:
        sums = accelerator.reduce(sums, "sum")
        usage.counts = accelerator.reduce(usage.counts, "sum")
    n = max(1.0, float(sums[0]))
    metrics = {"val/recon_l1": float(sums[1]) / n, "val/samples": n, **usage_metrics(usage, "val/")}
    if first is not None:
        metrics.update({f"val/{name}": float(total) / n for name, total in zip(per_sample, sums[2:])})
        if grid_path is not None and (accelerator is None or accelerator.is_main_process):
            write_png(recon_grid(*first, modality), grid_path)
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
def codebook_usage(model, loader, device, prefix: str = "usage/", accelerator=None) -> dict[str, float]:
    """Codebook usage over every sample of `loader` (MediaBatch), encoder and quantizer only: a pass over the train
    split costs a fraction of a reconstruction pass and counts many more tokens than the val split holds. Under
    several processes (each `loader` a share of the split) the counts are summed across them."""
    model.eval()
    usage = CodebookUsage(model.quantizer.num_codes, device=device)
    for batch in loader:
        usage.update(model.encode(batch.x.to(device)))
    usage.counts = reduce_sum(usage.counts, accelerator)
    return usage_metrics(usage, prefix)
