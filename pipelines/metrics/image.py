"""Per-image reconstruction metrics: PSNR and SSIM, batched in torch, one value per image.

Both take images in [0, 1], shape (B, C, H, W); `from_model_range` maps the tokenizer's [-1, 1] there. Averages over
a dataset are means of the per-image values. The official SimVQ code instead computes one PSNR from the MSE pooled
over a batch, 10·log10(1 / mean_batch(MSE)), which overweights the worst images and depends on the batch size
(SIMVQ_SPEC §3); `batch_psnr` keeps that formula only so a test can show the two differ.

SSIM follows Wang et al. 2004 as skimage's `structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=1, channel_axis=0)` computes it: an 11x11 Gaussian window (sigma 1.5),
K1 = 0.01, K2 = 0.03, the SSIM map averaged over positions where the window fits entirely inside the image, then
over channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11   # Gaussian window side (skimage: 2 * int(3.5 * sigma + 0.5) + 1 = 11 for sigma 1.5)
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
MIN_MSE = 1e-10    # identical images would give PSNR = inf; this caps them at 100 dB so means stay finite


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model images -> [0, 1], clamped (decoders overshoot)."""
    return ((x + 1) / 2).clamp(0, 1)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"image_metrics: expected two (B, C, H, W) tensors of equal shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if not (x.is_floating_point() and y.is_floating_point()):
        raise ValueError("image_metrics: expected float images in [0, 1]; convert uint8 with x.float() / 255 and "
                         "[-1, 1] model output with from_model_range(x)")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """(B,) PSNR in dB of each image pair."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return (10 * torch.log10(data_range**2 / mse.clamp_min(MIN_MSE))).to(x.dtype)


def batch_psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """The official code's pooled-MSE PSNR (one scalar per batch). Kept for comparison only: do not report it."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).mean()
    return (10 * torch.log10(data_range**2 / mse.clamp_min(MIN_MSE))).to(x.dtype)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype=torch.float64) -> torch.Tensor:
    """(size,) normalised 1-D Gaussian; the 2-D window is its outer product (it is separable)."""
    offsets = torch.arange(size, dtype=dtype) - (size - 1) / 2
    w = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return w / w.sum()


def _blur(x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of every channel: (N, C, H, W) -> (N, C, H - s + 1, W - s + 1)."""
    C, s = x.shape[1], window.numel()
    kh = window.view(1, 1, s, 1).expand(C, 1, s, 1)  # (C, 1, s, 1), depthwise
    kw = window.view(1, 1, 1, s).expand(C, 1, 1, s)  # (C, 1, 1, s)
    return F.conv2d(F.conv2d(x, kh, groups=C), kw, groups=C)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """(B,) mean SSIM of each image pair (computed in float64, returned in x's dtype)."""
    _check_pair(x, y)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"image_metrics.ssim: images {tuple(x.shape[-2:])} are smaller than the "
                         f"{SSIM_WINDOW}x{SSIM_WINDOW} window")
    x64, y64 = x.double(), y.double()
    window = gaussian_window(dtype=torch.float64).to(x.device)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    # One blur call over the five statistics stacked on the channel axis: (B, 5C, H, W).
    stats = _blur(torch.cat([x64, y64, x64 * x64, y64 * y64, x64 * y64], dim=1), window)
    mu_x, mu_y, xx, yy, xy = stats.chunk(5, dim=1)  # each (B, C, H', W')
    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov = xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).to(x.dtype)  # (B,): mean over channels and positions
