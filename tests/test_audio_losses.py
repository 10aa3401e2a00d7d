"""The audio recipe's losses (AUDIO_SPEC §2, §7): recon/mel exactly 0 on identical inputs, MPD/MRD/DAC logits and
feature maps for odd lengths, hinge / least-squares / feature matching by hand, each family averaged (MPD/5, MRD/3),
and the mel-only warm start that never calls a discriminator."""
import math

import pytest
import torch

from tokenizer.losses import (LossConfig, MelLoss, Scores, TokenizerLosses, feature_matching_loss, hinge_d_loss,
                              hinge_g_loss, lsgan_d_loss, lsgan_g_loss, mel_sizes)
from tokenizer.losses.audio_discriminators import (DACDiscriminator, MultiPeriodDiscriminator,
                                                   MultiResolutionDiscriminator, PeriodDiscriminator)

T = 16_001  # odd, a multiple of none of the periods
TINY = 1 / 16  # MPD channels 2, 8, 32, 64, 64; MRD 4


def ceil_div(n: int, d: int, times: int = 1) -> int:
    for _ in range(times):
        n = -(-n // d)
    return n


def audio(b: int = 2, t: int = T, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.randn(b, 1, t, generator=g)


def test_mel_is_exactly_zero_on_identical_inputs_and_positive_otherwise():
    mel = MelLoss(16_000)
    x = audio()
    assert mel(x, x.clone()).item() == 0.0
    assert mel(x, x + 1e-3 * audio(seed=1)).item() > 0
    assert mel(x, torch.zeros_like(x)).item() > mel(x, 0.9 * x).item() > 0  # silence is far: log(1e-7) floor
    assert mel.log_mel(x).shape == (2, 100, T // mel.hop + 1)  # center=True frames


def test_mel_sizes_are_the_paper_s_at_24_khz_and_keep_its_frame_rate_elsewhere():
    assert mel_sizes(24_000) == (1024, 256)
    assert mel_sizes(16_000) == (1024, 171)  # 10.7 ms hop; n_fft the power of two at or above 42.7 ms
    assert mel_sizes(48_000) == (2048, 512)
    assert mel_sizes(16_000, n_fft=512, hop=160) == (512, 160)
    with pytest.warns(UserWarning, match="all zero"), pytest.raises(ValueError, match="mel bands hold no FFT bin"):
        MelLoss(16_000, n_fft=128, n_mels=100)  # torchaudio only warns; the loss refuses


def test_recon_mel_needs_audio_and_its_rate():
    weights = {"recon/mel": 45.0}
    with pytest.raises(ValueError, match="recon/mel needs audio"):
        TokenizerLosses(LossConfig(weights=weights), in_channels=3, dims=2)
    with pytest.raises(ValueError, match="sample_rate=None"):
        TokenizerLosses(LossConfig(weights=weights), in_channels=1, dims=1)
    crit = TokenizerLosses(LossConfig(weights=weights), in_channels=1, dims=1, sample_rate=24_000)
    assert crit.mel.n_fft == 1024 and crit.mel.hop == 256 and len(crit.discriminators) == 0


def test_recon_mel_ms_is_dac_s_multiscale_mel_the_evaluation_reports_and_trains_the_waveform_s_timing():
    """recon/mel_ms is exactly 0 on identical clips, equals the evaluation's per-clip `mel_distance` averaged, and
    (unlike the single 64 ms recon/mel) tells a 1 ms shift of a pulse train from the original."""
    from pipelines.metrics.audio import mel_distance
    crit = TokenizerLosses(LossConfig(weights={"recon/mel_ms": 15.0}), in_channels=1, dims=1, sample_rate=16_000)
    assert crit.mel is None and crit.mel_ms is not None
    x, y = audio(), audio(seed=1)
    assert crit.generator_losses(x, x.clone())["recon/mel_ms"].item() == 0.0
    y.requires_grad_(True)
    loss = crit.generator_losses(x, y)["recon/mel_ms"]
    assert loss.item() == pytest.approx(mel_distance(x, y.detach(), 16_000).mean().item(), rel=1e-6)
    loss.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    pulses = torch.zeros(1, 1, 16_000)
    pulses[..., ::160] = 1.0  # 100 Hz glottal-like pulse train
    shifted = torch.roll(pulses, 16, dims=-1)  # 1 ms later: the same magnitude spectrum at long windows
    crit_both = TokenizerLosses(LossConfig(weights={"recon/mel": 1.0, "recon/mel_ms": 1.0}), in_channels=1, dims=1,
                                sample_rate=16_000)
    out = crit_both.generator_losses(pulses, shifted)
    assert out["recon/mel_ms"].item() > 10 * out["recon/mel"].item()
    with pytest.raises(ValueError, match="recon/mel_ms needs audio"):
        TokenizerLosses(LossConfig(weights={"recon/mel_ms": 1.0}), in_channels=3, dims=2)


@pytest.mark.parametrize("period", [2, 3, 5, 7, 11])
def test_mpd_logits_and_features_for_an_odd_length(period):
    torch.manual_seed(0)
    d = PeriodDiscriminator(period, width=TINY)
    out = d(audio())
    rows = ceil_div(T, period)  # reflect-padded to a multiple of the period, folded into `period` columns
    heights = [ceil_div(rows, 3, k) for k in (1, 2, 3, 4, 4)]  # four stride-3 convs, then a stride-1 one
    assert out.logits.shape == (2, 1, heights[-1], period)
    # Vocos' DiscriminatorP: the hidden activations after the first, then the logits
    assert [tuple(f.shape) for f in out.features] == [(2, c, h, period) for c, h in
                                                      zip((8, 32, 64, 64), heights[1:])] + [tuple(out.logits.shape)]
    assert sum(m.__class__.__name__ == "ParametrizationList" for m in d.modules()) == 6  # weight_norm on every conv


@pytest.mark.parametrize("n_fft, hop, win", [(1024, 256, 1024), (2048, 512, 2048), (512, 128, 512)])
def test_mrd_logits_and_features_for_an_odd_length(n_fft, hop, win):
    d = MultiResolutionDiscriminator([(n_fft, hop, win)], width=TINY)
    (out,) = d(audio())
    bins, frames = n_fft // 2 + 1, T // hop + 1
    f_strides, t_strides = (2, 2, 2, 2, 2), (2, 1, 2, 1, 2)  # (freq, time) strides of the five convs
    shapes, f, t = [], bins, frames
    for sf, st in zip(f_strides, t_strides):
        f, t = ceil_div(f, sf), ceil_div(t, st)
        shapes.append((2, 4, f, t))
    assert [tuple(x.shape) for x in out.features] == shapes + [(2, 1, f, t)]
    assert out.logits.shape == (2, 1, f, t)
    assert torch.equal(d[0].window, torch.ones(win))  # rectangular, as UnivNet/Vocos


def test_dac_discriminator_shapes_and_preprocessing():
    torch.manual_seed(0)
    d = DACDiscriminator(width=TINY)
    x = audio()
    outs = d(x)
    assert len(outs) == 8 and all(isinstance(o, Scores) for o in outs)
    for period, out in zip((2, 3, 5, 7, 11), outs[:5]):  # DAC pads a whole period even at a multiple
        assert out.logits.shape[-1] == period and len(out.features) == 5  # its FM leaves the logits out
    for n_fft, out in zip((2048, 1024, 512), outs[5:]):
        assert out.logits.shape[:3] == (2, 1, T // (n_fft // 4) + 1) and len(out.features) == 25  # 5 bands x 5
    with torch.no_grad():  # DC offset and level do not change its verdict (0.8 peak normalisation)
        for a, b in zip(outs, d(3 * x + 0.5)):
            torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=1e-4)


def test_adversarial_losses_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2; relu(1 - f) = 3, 1, 0
    assert hinge_d_loss(real, fake, scale=1.0).item() == pytest.approx(2.5 / 3 + 3 / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3 / 3))  # the image recipe's scale
    assert hinge_g_loss(fake).item() == pytest.approx(4 / 3)
    assert lsgan_g_loss(fake).item() == pytest.approx((9 + 1 + 0) / 3)
    assert lsgan_d_loss(real, fake).item() == pytest.approx((1 + 0.25 + 4) / 3 + (4 + 0 + 1) / 3)
    feats_r = [torch.zeros(2, 3), torch.ones(1, 4)]
    feats_f = [torch.full((2, 3), 2.0), torch.zeros(1, 4)]
    assert feature_matching_loss(feats_r, feats_f, "sum").item() == pytest.approx(2.0 + 1.0)  # sum over layers
    assert feature_matching_loss(feats_r, feats_f).item() == pytest.approx(1.5)


def recipe(**kw) -> TokenizerLosses:
    torch.manual_seed(0)
    cfg = LossConfig(weights={"recon/mel": 45.0, "gan/g": 1.0, "gan/fm": 1.0, "vq/commit": 1000.0},
                     discriminators=("mpd", "mrd"), mpd_width=TINY, mrd_width=TINY, **kw)
    return TokenizerLosses(cfg, in_channels=1, dims=1, sample_rate=16_000)


def test_each_family_is_averaged_over_its_sub_discriminators():
    """adv_MPD/5 + adv_MRD/3 + FM_MPD/5 + FM_MRD/3 and D likewise: the mean, not the sum, of a family."""
    crit = recipe()
    x = audio(t=8_000)
    x_hat = x + 0.1 * audio(t=8_000, seed=1)
    with torch.no_grad():
        g = crit.generator_losses(x, x_hat)
        d = crit.discriminator_losses(x, x_hat)
        mpd, mrd = crit.discriminators["mpd"], crit.discriminators["mrd"]
        by_hand = {}
        for name, disc in (("mpd", mpd), ("mrd", mrd)):
            real, fake = disc(x), disc(x_hat)
            assert len(fake) == {"mpd": 5, "mrd": 3}[name]
            adv = [hinge_g_loss(f.logits) for f in fake]
            fm = [sum((a - b).abs().mean() for a, b in zip(r.features, f.features)) for r, f in zip(real, fake)]
            dl = [torch.relu(1 - r.logits).mean() + torch.relu(1 + f.logits).mean() for r, f in zip(real, fake)]
            by_hand[name] = [sum(t) / len(t) for t in (adv, fm, dl)]
            assert abs(by_hand[name][0] * len(adv) - g[f"gan/g/{name}"]) > 1e-3  # the sum is not what is used
    for i, key in enumerate(("gan/g", "gan/fm")):
        for name in ("mpd", "mrd"):
            assert g[f"{key}/{name}"].item() == pytest.approx(by_hand[name][i].item(), rel=1e-5)
        assert g[key].item() == pytest.approx(by_hand["mpd"][i].item() + by_hand["mrd"][i].item(), rel=1e-5)
    for name in ("mpd", "mrd"):
        assert d[f"gan/d/{name}"].item() == pytest.approx(by_hand[name][2].item(), rel=1e-5)
    assert d["gan/d"].item() == pytest.approx(by_hand["mpd"][2].item() + by_hand["mrd"][2].item(), rel=1e-5)
    assert set(g) == {"recon/l1", "recon/l2", "recon/mel", "gan/g", "gan/g/mpd", "gan/g/mrd", "gan/fm", "gan/fm/mpd",
                      "gan/fm/mrd"}
    assert all(math.isfinite(float(v)) for v in {**g, **d}.values())


def test_generator_gradient_reaches_x_hat_only_and_the_warm_start_calls_no_discriminator():
    crit = recipe()
    x = audio(t=4_000)
    x_hat = (x + 0.1 * audio(t=4_000, seed=1)).requires_grad_(True)
    calls = []
    for disc in crit.discriminators.values():
        disc.register_forward_hook(lambda *args: calls.append(1))
    warm = crit.generator_losses(x, x_hat, gan=False)
    assert set(warm) == {"recon/l1", "recon/l2", "recon/mel"} and calls == []
    g = crit.generator_losses(x, x_hat)
    assert len(calls) == 4  # x_hat, then x for the feature-matching targets (each once per kind)
    (g["gan/g"] + g["gan/fm"] + 45 * g["recon/mel"]).backward()
    assert x_hat.grad.abs().sum() > 0


def test_audio_discriminators_refuse_images_and_fm_needs_feature_maps():
    with pytest.raises(ValueError, match="'mpd' discriminator judges mono waveforms"):
        TokenizerLosses(LossConfig(weights={"gan/g": 0.1}, discriminators=("mpd",)), in_channels=3, dims=2)
    crit = TokenizerLosses(LossConfig(weights={"gan/fm": 1.0}, discriminators=("patch",), disc_layers=2),
                           in_channels=1, dims=1)
    with pytest.raises(ValueError, match="none of the discriminators \\['patch'\\] returns feature maps"):
        crit.generator_losses(audio(t=256), audio(t=256, seed=1))
