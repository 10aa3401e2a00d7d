"""Named tokenizer losses: hand-computed GAN losses, LPIPS with a stand-in and with the VGG16 file layout (from state
dicts, from files through pipelines.lpips_weights), PatchGAN, the dict of discriminators, same seed -> same losses."""

import math

import pytest
import torch
from torch import nn

from pipelines.lpips_weights import build_lpips, lpips_for_losses
from tokenizer.losses import (DISCRIMINATORS, LPIPS, Discriminators, LossConfig, PatchDiscriminator, TokenizerLosses,
                              feature_matching_loss, hinge_d_loss, lpips_from_state_dicts, non_saturating_g_loss,
                              recon_l1, recon_l2, weighted_sum)


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
        lpips_for_losses(LossConfig())  # the default recipe wants LPIPS, and no path is set
    assert lpips_for_losses(LossConfig(weights={"recon/l1": 1.0}, vgg16_path="/nope")) is None  # no file read
    with pytest.raises(ValueError, match=r"no LPIPS module was passed.*lpips_weights\.build_lpips"):
        TokenizerLosses(LossConfig())  # the tokenizer package never opens the files itself


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
    assert list(crit.discriminators) == ["patch"] and isinstance(crit.discriminators["patch"], PatchDiscriminator)
    crit.discriminators.zero_grad()
    d["gan/d"].backward()
    assert all(p.grad is not None for p in crit.discriminators.parameters())


def test_zero_weights_skip_networks_and_unknown_names_fail():
    crit = TokenizerLosses(LossConfig(weights={"recon/l1": 1.0, "vq/commit": 1.0}), in_channels=1, dims=1)
    assert crit.lpips is None and len(crit.discriminators) == 0
    assert set(crit.generator_losses(torch.zeros(1, 1, 8), torch.ones(1, 1, 8))) == {"recon/l1", "recon/l2"}
    with pytest.raises(KeyError, match="recon/L1"):
        TokenizerLosses(LossConfig(weights={"recon/L1": 1.0}))
    with pytest.raises(ValueError, match="needs RGB images"):
        TokenizerLosses(LossConfig(weights={"perceptual/lpips": 1.0}), in_channels=1, dims=1, lpips=_stand_in_lpips())


def test_lpips_from_state_dicts_equals_the_file_path_and_today_s_values(lpips_files):
    """tokenizer.losses builds LPIPS from tensors; pipelines.lpips_weights reads the files. Both give the distances the
    file-reading tokenizer.losses.build_lpips gave at 024447c on the same (fixture) weights."""
    vgg_path, lin_path = lpips_files
    from_files = build_lpips(str(vgg_path), str(lin_path))
    from_tensors = lpips_from_state_dicts(torch.load(vgg_path, weights_only=True),
                                          torch.load(lin_path, weights_only=True))
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        d = from_tensors(x, y)
        assert torch.equal(d, from_files(x, y))
    assert d.tolist() == pytest.approx([0.6532460451126099, 0.6775585412979126], rel=1e-5)


def test_same_seed_gives_today_s_discriminator_and_losses():
    """Values recorded from tokenizer/losses.py at 024447c (one PatchGAN in `crit.discriminator`): the dict of
    discriminators creates the same weights from the same seed and computes the same named losses."""
    crit = TokenizerLosses(LossConfig(disc_channels=8, disc_layers=2), lpips=_stand_in_lpips())  # seeds 0 first
    d_keys = ["net.0.weight", "net.0.bias", "net.2.weight", "net.3.weight", "net.3.bias", "net.3.running_mean",
              "net.3.running_var", "net.3.num_batches_tracked", "net.5.weight", "net.6.weight", "net.6.bias",
              "net.6.running_mean", "net.6.running_var", "net.6.num_batches_tracked", "net.8.weight", "net.8.bias"]
    assert list(crit.discriminators["patch"].state_dict()) == d_keys  # the "d" weights of 024447c's checkpoints
    assert list(crit.discriminators.state_dict()) == [f"patch.{k}" for k in d_keys]  # "d" now: one model, prefixed
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    x_hat = x + 0.1 * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        got = {**crit.generator_losses(x, x_hat), **crit.discriminator_losses(x, x_hat)}
    expected = {"recon/l1": 0.07997582852840424, "recon/l2": 0.009990676306188107,
                "perceptual/lpips": 0.015443999320268631, "gan/g": 0.6626029014587402, "gan/d": 1.0123106241226196,
                "gan/logits_real": 0.039337627589702606, "gan/logits_fake": 0.06395889818668365}
    assert {k: float(v) for k, v in got.items()} == pytest.approx(expected, rel=1e-5)

    torch.manual_seed(0)  # 1-D, as the audio preset trains
    weights = {"recon/l1": 1.0, "gan/g": 0.1, "vq/commit": 1.0}
    crit = TokenizerLosses(LossConfig(weights=weights, disc_channels=8, disc_layers=2), in_channels=1, dims=1)
    a = torch.rand(2, 1, 64, generator=g) * 2 - 1
    b = a + 0.1 * torch.randn(a.shape, generator=g)
    with torch.no_grad():
        got = {**crit.generator_losses(a, b), **crit.discriminator_losses(a, b)}
    expected = {"recon/l1": 0.08001188933849335, "recon/l2": 0.00956856831908226, "gan/g": 0.7544991970062256,
                "gan/d": 0.9998105764389038, "gan/logits_real": -0.11870020627975464,
                "gan/logits_fake": -0.11907894164323807}
    assert {k: float(v) for k, v in got.items()} == pytest.approx(expected, rel=1e-5)


class TwoScales(nn.Module):
    """A multi-output discriminator (as MPD/MRD): a list of logits, one per sub-discriminator."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.full = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.coarse = nn.Conv2d(in_channels, 1, 3, stride=2, padding=1)

    def forward(self, x):
        return [self.full(x), self.coarse(x)]


def test_discriminators_are_a_dict_of_kinds_and_their_losses_add_up(monkeypatch):
    monkeypatch.setitem(DISCRIMINATORS, "two-scales", lambda cfg, in_channels, dims: TwoScales(in_channels))
    weights = {"recon/l1": 1.0, "gan/g": 0.1}
    cfg = LossConfig(weights=weights, discriminators=("patch", "two-scales"), disc_channels=8, disc_layers=2)
    torch.manual_seed(0)
    crit = TokenizerLosses(cfg)
    assert list(crit.discriminators) == ["patch", "two-scales"]
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x_hat = x + 0.1 * torch.randn_like(x)
    patch, two = crit.discriminators["patch"], crit.discriminators["two-scales"]
    with torch.no_grad():
        g = crit.generator_losses(x, x_hat)["gan/g"]
        parts = [non_saturating_g_loss(patch(x_hat))] + [non_saturating_g_loss(l) for l in two(x_hat)]
        torch.testing.assert_close(g, sum(parts))
        patch.eval()  # BatchNorm in eval: the D loss recomputed by hand sees the same statistics
        d = crit.discriminator_losses(x, x_hat)["gan/d"]
        parts = [hinge_d_loss(patch(x), patch(x_hat))] + [hinge_d_loss(r, f) for r, f in zip(two(x), two(x_hat))]
        torch.testing.assert_close(d, sum(parts))
    with torch.no_grad():  # one module runs them all: {name: [logits, ...]}
        out = crit.discriminators(x)
    assert list(out) == ["patch", "two-scales"] and [len(v) for v in out.values()] == [1, 2]
    assert hasattr(crit, "discriminators") and not hasattr(crit, "discriminator")  # the single-D shim is gone
    with pytest.raises(ValueError, match=r"names \['patch'\] more than once"):
        TokenizerLosses(LossConfig(weights=weights, discriminators=("patch", "two-scales", "patch")))
    # (this used 'mpd' before the audio discriminators were registered: now a kind, so 'msd' is the unknown one)
    with pytest.raises(KeyError, match=r"unknown discriminator 'msd'.*\['dac', 'mpd', 'mrd', 'patch', 'two-scales'\]"):
        TokenizerLosses(LossConfig(weights=weights, discriminators=("msd",)))
    with pytest.raises(ValueError, match="`discriminators` setting is empty"):
        TokenizerLosses(LossConfig(weights=weights, discriminators=()))


class Counting(nn.Module):
    """Stands in for the DDP wrapper the trainer returns: calls the wrapped module and counts the calls."""

    def __init__(self, module):
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, x):
        self.calls += 1
        return self.module(x)


def test_losses_call_the_given_module_once_per_input(monkeypatch):
    """Under DDP only a call to the wrapper's forward all-reduces the discriminators' gradients: both loss methods
    call the module passed as `d` (one call for x_hat, then one for x and one for x_hat), never the children."""
    monkeypatch.setitem(DISCRIMINATORS, "two-scales", lambda cfg, in_channels, dims: TwoScales(in_channels))
    cfg = LossConfig(weights={"gan/g": 0.1}, discriminators=("patch", "two-scales"), disc_channels=8, disc_layers=2)
    crit = TokenizerLosses(cfg)
    wrapped, children = Counting(crit.discriminators), []
    for name, child in crit.discriminators.items():
        child.register_forward_hook(lambda module, args, out, name=name: children.append(name))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert set(crit.generator_losses(x, x, d=wrapped)) == {"recon/l1", "recon/l2", "gan/g"}
    assert wrapped.calls == 1 and children == ["patch", "two-scales"]  # every child ran inside the one call
    assert set(crit.discriminator_losses(x, x, d=wrapped)) == {"gan/d", "gan/logits_real", "gan/logits_fake"}
    assert wrapped.calls == 3 and children == ["patch", "two-scales"] * 3
    crit.generator_losses(x, x)  # no `d`: the unwrapped Discriminators, still one call
    assert wrapped.calls == 3 and children == ["patch", "two-scales"] * 4


def test_one_discriminator_loads_the_unprefixed_weights_of_older_checkpoints():
    """Checkpoints written before the dict of discriminators hold the single PatchGAN's keys without `patch.`."""
    torch.manual_seed(0)
    old = PatchDiscriminator(ch=8, n_layers=2)
    torch.manual_seed(1)
    d = Discriminators({"patch": PatchDiscriminator(ch=8, n_layers=2)})
    d.load_state_dict(old.state_dict())
    assert all(torch.equal(v, old.state_dict()[k.removeprefix("patch.")]) for k, v in d.state_dict().items())
    d.load_state_dict(d.state_dict())  # the prefixed keys load as they are
    two = Discriminators({"patch": PatchDiscriminator(ch=8, n_layers=2), "other": nn.Conv2d(3, 1, 3)})
    with pytest.raises(RuntimeError, match="Missing key"):  # with two, unprefixed keys are ambiguous: refused
        two.load_state_dict(old.state_dict())


def test_feature_matching_by_hand():
    real = [torch.zeros(2, 3), torch.ones(1, 4)]
    fake = [torch.full((2, 3), 2.0, requires_grad=True), torch.zeros(1, 4, requires_grad=True)]
    loss = feature_matching_loss(real, fake)
    assert loss.item() == pytest.approx((2.0 + 1.0) / 2)
    loss.backward()
    assert all(f.grad is not None for f in fake)
    with pytest.raises(ValueError, match="same non-zero number"):
        feature_matching_loss(real, fake[:1])
