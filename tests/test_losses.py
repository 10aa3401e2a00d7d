"""Named tokenizer losses: hand-computed GAN losses, LPIPS with a stand-in and with the VGG16 file layout, PatchGAN."""

import math

import pytest
import torch
from torch import nn

from tokenizer.losses import (LPIPS, LossConfig, PatchDiscriminator, TokenizerLosses,
                              build_lpips, hinge_d_loss, non_saturating_g_loss, recon_l1, recon_l2, weighted_sum)


class TinyBackbone(nn.Module):
    """Random two-stage stand-in for VGG16: returns one feature map per LPIPS head."""

    channels = (4, 8)

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x):
        fa = self.a(x)
        return [fa, self.b(fa)]


def _stand_in_lpips() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(TinyBackbone(), TinyBackbone.channels)


def test_recon_losses_by_hand():
    x, y = torch.zeros(2, 3), torch.tensor([[1.0, -2.0, 0.0], [0.0, 0.0, 3.0]])
    assert recon_l1(x, y).item() == pytest.approx(6 / 6)
    assert recon_l2(x, y).item() == pytest.approx(14 / 6)


def test_hinge_d_loss_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3 / 3))


def test_non_saturating_g_loss_uses_per_sample_mean_logit():
    logits = torch.tensor([[[[1.0, 3.0], [-1.0, 1.0]]], [[[-4.0, 0.0], [0.0, 0.0]]]])  # (2, 1, 2, 2), means 1, -1
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert non_saturating_g_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_weighted_sum_and_its_errors():
    losses = {"recon/l1": torch.tensor(2.0), "vq/commit": torch.tensor(0.5), "recon/l2": torch.tensor(9.0)}
    total = weighted_sum(losses, {"recon/l1": 1.0, "vq/commit": 4.0, "gan/g": 0.0})
    assert total.item() == pytest.approx(4.0)  # recon/l2 is logged only; gan/g has weight 0
    with pytest.raises(KeyError, match="perceptual/lpips"):
        weighted_sum(losses, {"perceptual/lpips": 1.0})


def test_lpips_stand_in_zero_for_identical_positive_otherwise():
    lpips = _stand_in_lpips()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(lpips(x, x), torch.zeros(2))
    y = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    d.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0  # it trains the generator ...
    assert all(p.grad is None for p in lpips.parameters())  # ... and never itself
    lpips.train()
    assert not lpips.training


def test_lpips_from_vgg16_and_lin_files(lpips_files, tmp_path):
    vgg_path, lin_path = lpips_files
    vgg_sd = torch.load(vgg_path, weights_only=True)
    lin = torch.load(lin_path, weights_only=True)
    lpips = build_lpips(str(vgg_path), str(lin_path))
    torch.testing.assert_close(lpips.heads[3].weight, lin["lin3.model.1.weight"])
    torch.testing.assert_close(lpips.backbone.slices[4][1].weight, vgg_sd["features.24.weight"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert lpips(x, x).item() == 0.0
        assert lpips(x, -x).item() > 0.0

    torch.save({"lin0.weight": torch.rand(1, 64, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="lpips_lin_path"):
        build_lpips(str(vgg_path), str(tmp_path / "bad.pth"))


def test_missing_lpips_weights_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`vgg16_path` is empty.*perceptual/lpips"):
        build_lpips("", str(tmp_path / "lin.pth"))
    with pytest.raises(FileNotFoundError, match=r"`vgg16_path`=.*does not exist"):
        build_lpips(str(tmp_path / "nope.pth"), "")
    with pytest.raises(FileNotFoundError, match="vgg16_path"):
        TokenizerLosses(LossConfig())  # the default recipe wants LPIPS, and no path is set


@pytest.mark.parametrize("dims, shape, expected", [(2, (2, 3, 32, 32), (2, 1, 2, 2)), (1, (2, 1, 64), (2, 1, 6))])
def test_patchgan_output_shape(dims, shape, expected):
    d = PatchDiscriminator(in_channels=shape[1], ch=8, n_layers=3, dims=dims)
    assert d(torch.randn(*shape)).shape == expected
    assert sum(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in d.modules()) == 3


def test_patchgan_rejects_too_small_inputs():
    with pytest.raises(ValueError, match="disc_layers=3 needs inputs of at least 24"):
        PatchDiscriminator(ch=8, n_layers=3)(torch.randn(2, 3, 16, 16))
    assert PatchDiscriminator(ch=8, n_layers=2)(torch.randn(2, 3, 16, 16)).shape == (2, 1, 2, 2)


def test_tokenizer_losses_generator_and_discriminator_steps():
    cfg = LossConfig(disc_channels=8, disc_layers=2)
    crit = TokenizerLosses(cfg, lpips=_stand_in_lpips())
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    x_hat = (x + 0.1 * torch.randn_like(x)).requires_grad_(True)
    g = crit.generator_losses(x, x_hat)
    assert set(g) == {"recon/l1", "recon/l2", "perceptual/lpips", "gan/g"}
    total = weighted_sum({**g, "vq/commit": torch.tensor(0.0)}, cfg.weights)
    total.backward()
    assert x_hat.grad.abs().sum() > 0
    d = crit.discriminator_losses(x, x_hat)
    assert {"gan/d", "gan/logits_real", "gan/logits_fake"} <= set(d)
    crit.discriminator.zero_grad()
    d["gan/d"].backward()
    assert all(p.grad is not None for p in crit.discriminator.parameters())


def test_zero_weights_skip_networks_and_unknown_names_fail():
    crit = TokenizerLosses(LossConfig(weights={"recon/l1": 1.0, "vq/commit": 1.0}), in_channels=1, dims=1)
    assert crit.lpips is None and crit.discriminator is None
    assert set(crit.generator_losses(torch.zeros(1, 1, 8), torch.ones(1, 1, 8))) == {"recon/l1", "recon/l2"}
    with pytest.raises(KeyError, match="recon/L1"):
        TokenizerLosses(LossConfig(weights={"recon/L1": 1.0}))
    with pytest.raises(ValueError, match="needs RGB images"):
        TokenizerLosses(LossConfig(weights={"perceptual/lpips": 1.0}), in_channels=1, dims=1, lpips=_stand_in_lpips())
