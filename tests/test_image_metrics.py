"""Per-image PSNR/SSIM: the per-image mean is not the official pooled-batch PSNR, and SSIM equals skimage's."""
import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from pipelines.metrics.image import batch_psnr, from_model_range, gaussian_window, psnr, ssim


def _pair(shape=(3, 3, 24, 20), noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    y = (x + noise * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return x, y


def test_psnr_per_image_differs_from_pooled_batch_formula():
    # Image 0 off by 0.01 everywhere (MSE 1e-4 -> 40 dB), image 1 off by 0.1 (MSE 1e-2 -> 20 dB).
    x = torch.full((2, 3, 8, 8), 0.5, dtype=torch.float64)
    y = x.clone()
    y[0] += 0.01
    y[1] += 0.1
    per_image = psnr(x, y)
    assert torch.allclose(per_image, torch.tensor([40.0, 20.0], dtype=torch.float64), atol=1e-9)
    assert per_image.mean().item() == pytest.approx(30.0)
    # The official code's number: one PSNR of the MSE pooled over the batch, 10 log10(1 / 0.00505) = 22.97 dB.
    pooled = batch_psnr(x, y).item()
    assert pooled == pytest.approx(10 * math.log10(1 / 0.00505), abs=1e-9)
    assert abs(pooled - per_image.mean().item()) > 5


def test_psnr_matches_skimage_per_image():
    x, y = _pair()
    ours = psnr(x, y)
    assert ours.shape == (3,)
    ref = [peak_signal_noise_ratio(a.numpy(), b.numpy(), data_range=1.0) for a, b in zip(x, y)]
    assert np.allclose(ours.numpy(), ref, atol=1e-9)


def test_psnr_identical_images_is_finite():
    x, _ = _pair()
    assert torch.isfinite(psnr(x, x)).all()


@pytest.mark.parametrize("shape,noise", [((3, 3, 24, 20), 0.1), ((2, 1, 16, 16), 0.3), ((2, 3, 11, 13), 0.05)])
def test_ssim_matches_skimage(shape, noise):
    x, y = _pair(shape, noise)
    ours = ssim(x, y)
    assert ours.shape == (shape[0],)
    ref = [structural_similarity(a.numpy(), b.numpy(), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=1.0, channel_axis=0) for a, b in zip(x, y)]
    assert np.allclose(ours.numpy(), ref, atol=1e-7), (ours, ref)


def test_ssim_float32_and_identity():
    x, y = _pair()
    assert torch.allclose(ssim(x, x), torch.ones(3, dtype=torch.float64))
    assert ssim(x.float(), y.float()).dtype == torch.float32
    assert (ssim(x, y) < 1).all()


def test_gaussian_window_is_normalised_and_symmetric():
    w = gaussian_window()
    assert w.numel() == 11 and torch.isclose(w.sum(), torch.tensor(1.0, dtype=w.dtype))
    assert torch.allclose(w, w.flip(0))


def test_bad_inputs_fail_loudly():
    x, y = _pair()
    with pytest.raises(ValueError, match="equal shape"):
        psnr(x, y[:2])
    with pytest.raises(ValueError, match="float images"):
        ssim((x * 255).to(torch.uint8), (y * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="smaller than"):
        ssim(x[..., :8, :8], y[..., :8, :8])


def test_from_model_range():
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.2])
    assert torch.equal(from_model_range(x), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
