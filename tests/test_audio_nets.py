"""The `seanet-vocos` arch as codec projects test theirs (DAC, EnCodec, audiocraft; docs/AUDIO_SPEC §7): exact output
lengths, causality, the iSTFT head inverting a known STFT, EnCodec's padding arithmetic, the paper size's parameter
counts, refusals, and one training step without NaN. Tiny widths throughout; the paper size is built, never run."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from tokenizer import TokenizerConfig, build_tokenizer
from tokenizer.nets import ARCHS, get_arch
from tokenizer.nets.seanet_vocos import ISTFTHead, PaddedConv1d, encodec_padding, reflect_pad

ARCH = "seanet-vocos"
# Tiny nets with the paper's strides (hop 320), or a hop of 6 where many lengths are tried.
TINY = {"n_filters": 2, "z_channels": 8, "dim": 64, "intermediate_dim": 32, "num_layers": 1}  # GroupNorm(32): 2 ch/group
TINY_HOP6 = {**TINY, "strides": [2, 3], "n_fft": 24}


def tiny(causal=True, hop6=False, **net) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = TokenizerConfig(arch=ARCH, size="cpu", dims=1, in_channels=1, num_codes=32,
                          net={**(TINY_HOP6 if hop6 else TINY), "causal": causal, **net})
    return build_tokenizer(cfg).eval()


def test_sizes_are_registered():
    arch = get_arch(ARCH)
    assert ARCHS[ARCH] is arch and set(arch.sizes) == {"paper", "cpu"}
    assert arch.downsample_factor("paper") == arch.downsample_factor("cpu") == 320  # 75 tokens/s at 24 kHz
    assert arch.latent_channels("paper") == 512 and arch.sizes["paper"].n_fft == 4 * 320


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_size_has_the_official_parameter_counts():
    """docs/AUDIO_SPEC §1 and the official state dict (audio_released_keys.json): encoder 8,802,816 (weight norm's g
    included), Vocos backbone 61,901,568, iSTFT head 985,858. (Built on CPU, never run: `meta` would take longer.)"""
    encoder, decoder = get_arch(ARCH).build("paper", dims=1, in_channels=1)
    assert count(encoder) == 8_802_816
    assert count(decoder.backbone) == 61_901_568
    assert count(decoder.head) == 985_858


def test_cpu_size_is_small():
    encoder, decoder = get_arch(ARCH).build("cpu", dims=1, in_channels=1)
    assert count(encoder) + count(decoder) < 7_000_000


@pytest.mark.parametrize("setting,kwargs,message", [
    ("dims", {"dims": 2, "in_channels": 1}, "dims=2"),
    ("in_channels", {"dims": 1, "in_channels": 2}, "in_channels=2"),
])
def test_refuses_images_and_stereo_in_one_line(setting, kwargs, message):
    with pytest.raises(ValueError, match=message) as e:
        build_tokenizer(TokenizerConfig(arch=ARCH, size="cpu", num_codes=8, net=TINY, **kwargs))
    assert f"`{setting}`" in str(e.value) and "\n" not in str(e.value)


def test_refuses_an_istft_it_cannot_invert():
    with pytest.raises(ValueError, match="net.n_fft"):
        tiny(n_fft=321)  # (n_fft - hop) odd: the trim would be off by one
    with pytest.raises(ValueError, match="net.n_fft"):
        tiny(n_fft=320)  # no overlap: the Hann window's zeros are not covered


@pytest.mark.parametrize("causal", [True, False])
def test_exact_lengths_for_random_lengths(causal):
    rng = random.Random(0)
    model = tiny(causal, hop6=True)
    for frames in [1, 2, 3] + rng.sample(range(4, 200), 6):
        x = torch.randn(1, 1, 6 * frames)
        with torch.no_grad():
            out = model(x)
        assert out.codes.shape == (1, frames) and out.x_hat.shape == x.shape
    paper_hop = tiny(causal)
    x = torch.randn(2, 1, 320 * 7)
    with torch.no_grad():
        assert paper_hop.encode(x).shape == (2, 7) and paper_hop(x).x_hat.shape == x.shape
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 320"):
        paper_hop.encode(torch.randn(1, 1, 1000))


@pytest.mark.parametrize("causal", [True, False])
def test_padded_conv_gives_ceil_length_over_stride(causal):
    """EnCodec's rule: fixed padding k_eff - stride, plus the right padding that completes the last window."""
    for stride in (1, 2, 3, 5):
        for dilation in ((1, 2) if stride == 1 else (1,)):
            kernel = 3 if stride == 1 else 2 * stride
            conv = PaddedConv1d(1, 1, kernel, stride=stride, dilation=dilation, causal=causal)
            for length in range(1, 23):
                total, extra = (kernel - 1) * dilation + 1 - stride, -length % stride
                expected = (total, extra) if causal else (total - total // 2, total // 2 + extra)
                assert encodec_padding(length, kernel, stride, dilation, causal) == expected
                assert conv(torch.randn(1, 1, length)).shape[-1] == math.ceil(length / stride)


def test_reflect_pad_on_inputs_shorter_than_the_padding():
    """EnCodec's pad1d: zeros appended before reflecting, cut off after."""
    x = torch.tensor([[[1.0, 2.0, 3.0]]])
    assert reflect_pad(x, 6, 0).flatten().tolist() == [0, 0, 0, 0, 3, 2, 1, 2, 3]
    assert torch.equal(reflect_pad(x, 2, 1), F.pad(x, (2, 1), mode="reflect"))


def test_causal_encoder_ignores_the_future_and_the_non_causal_one_does_not():
    """Changing samples from t on leaves the latents of every frame that ends before t unchanged, and changes the
    frame t falls in."""
    hop, frames, cut = 320, 24, 16
    x = torch.randn(1, 1, hop * frames)
    changed = x.clone()
    changed[..., cut * hop + 100:] = torch.randn(hop * (frames - cut) - 100)
    for causal in (True, False):
        model = tiny(causal)
        with torch.no_grad():
            z, z2 = model.encoder(x), model.encoder(changed)
            codes, codes2 = model.encode(x), model.encode(changed)
        if causal:
            assert torch.equal(z[..., :cut], z2[..., :cut]) and torch.equal(codes[:, :cut], codes2[:, :cut])
            assert not torch.allclose(z[..., cut], z2[..., cut], atol=1e-6)
        else:
            assert not torch.allclose(z[..., :cut], z2[..., :cut], atol=1e-6)


def test_causal_encoder_looks_ahead_only_at_the_start():
    """Reflect padding (EnCodec's) mirrors frames 1-6 into the last k7 conv's left padding: a change from 6 hops on
    still reaches frame 0, one from 7 hops on reaches no earlier frame."""
    model, hop = tiny(True), 320
    x = torch.randn(1, 1, hop * 12)
    with torch.no_grad():
        z = model.encoder(x)
        for start, first_changed in ((6, 0), (7, 7)):
            changed = x.clone()
            changed[..., start * hop:] = 0
            moved = (model.encoder(changed) - z).abs().amax(1)[0] > 0  # (frames,)
            assert int(moved.nonzero()[0]) == first_changed


def test_istft_head_inverts_a_known_stft():
    """The head's hand-made "same" iSTFT returns a signal from its STFT (frames centred hop-aligned, window = Hann),
    everywhere, the edges included: the squared-window envelope is divided out. torch.istft(center=True) on the same
    frames is shifted and short."""
    n_fft, hop, frames = 1280, 320, 12
    head = ISTFTHead(dim=8, n_fft=n_fft, hop=hop)
    torch.manual_seed(0)
    t = torch.arange(frames * hop) / 24_000
    x = torch.stack([0.3 * torch.sin(2 * math.pi * 220 * t), 0.1 * torch.randn(frames * hop)])  # (2, T)
    pad = (n_fft - hop) // 2  # frame f is centred on sample f * hop + hop / 2 of the output
    spec = torch.stft(F.pad(x, (pad, pad)), n_fft, hop, window=torch.hann_window(n_fft), center=False,
                      return_complex=True)  # (2, n_fft/2 + 1, frames)
    assert spec.shape[-1] == frames
    y = head.istft(spec)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)
    centred = torch.istft(spec, n_fft, hop, window=torch.hann_window(n_fft), center=True)
    assert centred.shape[-1] == (frames - 1) * hop  # not the T the tokenizer must give back


def test_istft_head_clips_the_magnitude_at_100():
    head = ISTFTHead(dim=4, n_fft=24, hop=6)
    with torch.no_grad():
        head.out.weight.zero_()
        head.out.bias.zero_()
        head.out.bias[:13] = 10.0  # log-magnitude 10 -> e^10, clipped to 100; phase 0
        y = head(torch.zeros(1, 5, 4))
    torch.testing.assert_close(y, head.istft(torch.full((1, 13, 5), 100.0, dtype=torch.complex64)))


def test_round_trip_and_grid():
    model = tiny()
    x = torch.randn(2, 1, 320 * 3)
    assert model.grid_shape(x.shape) == (3,)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(model.encode(x), out.codes)
        torch.testing.assert_close(model.decode(out.codes), out.x_hat, rtol=1e-5, atol=1e-6)


def test_one_training_step_with_weight_norm_is_finite():
    model = tiny(weight_norm=True).train()
    assert any("parametrizations.weight.original0" in k for k in model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = 0.3 * torch.randn(2, 1, 640)
    for _ in range(2):
        out = model(x)
        loss = (out.x_hat - x).abs().mean() + 1000 * out.losses["vq/commit"]  # the paper's commitment weight
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                            if p.grad is not None)
        opt.step()
