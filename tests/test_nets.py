"""Encoder/decoder shapes for every registered size in 1-D and 2-D, the arch registry (same keys and same seeded
weights as before it existed), the autoencoder round trip, a tiny overfit."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tokenizer import NET_SIZES, TokenizerConfig, build_tokenizer
from tokenizer.nets import ARCHS, Arch, get_arch
from tokenizer.nets.conv import Decoder, Encoder, PixelShuffle1d, group_norm


def _input(size: str, dims: int) -> torch.Tensor:
    f = NET_SIZES[size].downsample_factor
    side = max(16, 4 * f) if dims == 2 else 4 * f  # small inputs: 4 tokens per axis at most
    shape = (1, 3, side, side) if dims == 2 else (2, 1, side)
    return torch.randn(*shape)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("size", sorted(NET_SIZES))
def test_encoder_decoder_shapes(size, dims):
    torch.manual_seed(0)
    cfg = NET_SIZES[size]
    x = _input(size, dims)
    enc, dec = Encoder(cfg, in_channels=x.shape[1], dims=dims), Decoder(cfg, out_channels=x.shape[1], dims=dims)
    with torch.no_grad():
        z = enc(x)
        grid = tuple(s // cfg.downsample_factor for s in x.shape[2:])
        assert z.shape == (x.shape[0], cfg.z_channels, *grid)
        assert dec(z).shape == x.shape


def test_tiny_gives_16_tokens_for_16x16_digits():
    ae = build_tokenizer(TokenizerConfig(size="tiny", num_codes=64))
    assert ae.grid_shape((16, 16)) == (4, 4)
    assert ae.grid_shape((8, 3, 16, 16)) == (4, 4)
    with pytest.raises(ValueError, match="divisible"):
        ae.grid_shape((18, 16))


def test_pixel_shuffle_1d_interleaves_phases():
    x = torch.tensor([[[0.0, 2.0, 4.0], [1.0, 3.0, 5.0]]])  # (B=1, C*r=2, T=3): channel i = phase i
    assert torch.equal(PixelShuffle1d(2)(x), torch.arange(6.0).view(1, 1, 6))


def test_group_norm_groups_divide_channels():
    for c in (3, 8, 32, 96, 128, 512):
        gn = group_norm(c)
        assert c % gn.num_groups == 0 and gn.num_groups <= 32
    assert group_norm(512).num_groups == 32  # the paper's setting for wide layers


def test_indivisible_input_is_rejected_with_a_message():
    enc = Encoder(NET_SIZES["tiny"], dims=2)
    with pytest.raises(ValueError, match="not divisible by the downsampling factor 4"):
        enc(torch.randn(1, 3, 18, 16))


@pytest.mark.parametrize("quantizer", ["simvq", "vq"])
@pytest.mark.parametrize("dims", [1, 2])
def test_autoencoder_round_trip(quantizer, dims):
    torch.manual_seed(0)
    ae = build_tokenizer(TokenizerConfig(size="tiny", dims=dims, in_channels=3, quantizer=quantizer, num_codes=64))
    ae.eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1 if dims == 2 else torch.rand(2, 3, 32) * 2 - 1
    with torch.no_grad():
        out = ae(x)
        codes = ae.encode(x)
        assert codes.dtype == torch.int64 and codes.shape == (2, *ae.grid_shape(x.shape))
        assert torch.equal(codes, out.codes)
        assert ae.decode(codes).shape == x.shape
        # decode never re-quantizes: from the codes it gives exactly forward's reconstruction
        torch.testing.assert_close(ae.decode(out.codes), out.x_hat, rtol=1e-5, atol=1e-5)
    assert set(out.losses) == {"vq/commit"} and out.losses["vq/commit"].dim() == 0


def test_paper_b_size_parameter_count():
    ae = build_tokenizer(TokenizerConfig(size="b", num_codes=1024))
    n = sum(p.numel() for p in ae.parameters() if p.requires_grad)
    print(f"tokenizer 'b' (encoder+decoder+SimVQ W): {n / 1e6:.2f}M trainable parameters")
    assert 40e6 < n < 90e6, n  # Open-MAGVIT2 "B" conv net, no attention
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert ae.encode(x).shape == (1, 4, 4)


def test_tiny_autoencoder_overfits_a_fixed_batch():
    torch.manual_seed(0)
    ae = build_tokenizer(TokenizerConfig(size="tiny", num_codes=256))
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    opt = torch.optim.Adam(ae.parameters(), lr=1e-3)
    l1s = []
    for _ in range(30):
        out = ae(x)
        l1 = (out.x_hat - x).abs().mean()
        loss = l1 + out.losses["vq/commit"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        l1s.append(l1.item())
    assert sum(l1s[-5:]) / 5 < 0.8 * sum(l1s[:5]) / 5, l1s


# ------------------------------------------------------------------ the arch registry (issue 9)

def weights_checksum(state: dict[str, torch.Tensor]) -> float:
    """Position-weighted sum over the tensors in state_dict order: moving, swapping or redrawing values changes it."""
    total = 0.0
    for k, t in enumerate(state.values()):
        v = t.detach().double().flatten()
        total += (k + 1) * float((v * torch.linspace(1.0, 2.0, v.numel(), dtype=torch.float64)).sum())
    return total


def test_unknown_arch_or_size_is_an_error_naming_the_choices():
    with pytest.raises(KeyError, match=r"unknown tokenizer arch 'seanet'.*`arch`.*\['conv', 'seanet-vocos'\]"):
        build_tokenizer(TokenizerConfig(arch="seanet"))
    with pytest.raises(KeyError, match=r"unknown tokenizer size 'xl' for arch 'conv'.*'audio-s', 'b', 's', 'tiny'"):
        build_tokenizer(TokenizerConfig(size="xl"))
    with pytest.raises(KeyError, match="choose one of"):
        get_arch("")


def test_conv_arch_reports_latent_channels_and_downsample_factor():
    arch = ARCHS["conv"]
    assert TokenizerConfig().arch == "conv" and arch.sizes is NET_SIZES
    assert (arch.latent_channels("tiny"), arch.downsample_factor("tiny")) == (32, 4)
    assert (arch.latent_channels("audio-s"), arch.downsample_factor("audio-s")) == (128, 64)  # hop 64 samples
    enc, dec = arch.build("tiny", dims=1, in_channels=1)
    assert isinstance(enc, Encoder) and isinstance(dec, Decoder) and enc.dims == 1
    assert enc.conv_in.in_channels == 1 and dec.conv_out.out_channels == 1


def test_a_new_arch_plugs_in_by_one_registry_entry(monkeypatch):
    """What an audio arch (SEANet + Vocos) will do: its own size config and builder, no change to the conv code."""

    @dataclass(frozen=True)
    class StridedSize:  # another family's size config: the registry only reads z_channels and downsample_factor
        z_channels: int
        hop: int

        @property
        def downsample_factor(self) -> int:
            return self.hop

    def build_nets(cfg: StridedSize, dims: int, in_channels: int) -> tuple[nn.Module, nn.Module]:
        assert dims == 1
        return (nn.Conv1d(in_channels, cfg.z_channels, cfg.hop, stride=cfg.hop),
                nn.ConvTranspose1d(cfg.z_channels, in_channels, cfg.hop, stride=cfg.hop))

    sizes = {"hop8": StridedSize(z_channels=16, hop=8)}
    monkeypatch.setitem(ARCHS, "strided", Arch("strided", sizes, build_nets))
    ae = build_tokenizer(TokenizerConfig(arch="strided", size="hop8", dims=1, in_channels=1, num_codes=32))
    assert ae.downsample_factor == 8 and ae.quantizer.dim == 16
    x = torch.randn(2, 1, 64)
    assert ae.encode(x).shape == (2, 8) and ae(x).x_hat.shape == x.shape
    with pytest.raises(KeyError, match=r"for arch 'strided'.*\['hop8'\]"):
        build_tokenizer(TokenizerConfig(arch="strided", size="tiny"))


def test_state_dict_keys_and_shapes_are_those_of_today_s_checkpoints():
    """Checkpoints written before the arch registry (tokenizer/nets.py, commit 024447c) must still load strictly."""
    ae = build_tokenizer(TokenizerConfig(size="tiny"))
    got = [f"{k} {'x'.join(map(str, v.shape))}" for k, v in ae.state_dict().items()]
    assert got == [line.strip() for line in TINY_STATE_DICT_BEFORE_REGISTRY.strip().splitlines()]


@pytest.mark.parametrize("size, dims, in_channels, expected", [
    ("tiny", 2, 3, (17903.65893004015, 15014.668584465315)),
    ("audio-s", 1, 1, (219258.9953144563, 112036.61113029758)),
])
def test_same_seed_gives_the_initial_weights_of_before_the_registry(size, dims, in_channels, expected):
    """Checksums recorded from tokenizer/nets.py at 024447c: Encoder(...) then Decoder(...) after manual_seed(0)."""
    torch.manual_seed(0)
    enc, dec = ARCHS["conv"].build(size, dims=dims, in_channels=in_channels)
    got = (weights_checksum(enc.state_dict()), weights_checksum(dec.state_dict()))
    assert got == pytest.approx(expected, rel=1e-6)


def test_same_seed_gives_the_tokenizer_of_before_the_registry():
    """The whole tiny SimVQ tokenizer after manual_seed(0) (quantizer built before the nets), recorded at 024447c."""
    torch.manual_seed(0)
    ae = build_tokenizer(TokenizerConfig(size="tiny"))
    assert weights_checksum(ae.encoder.state_dict()) == pytest.approx(18650.569654807674, rel=1e-6)
    assert weights_checksum(ae.decoder.state_dict()) == pytest.approx(14912.319355011014, rel=1e-6)
    assert weights_checksum(ae.state_dict()) == pytest.approx(65787.67582791502, rel=1e-6)


# build_tokenizer(TokenizerConfig(size="tiny")).state_dict(): name and shape in order, tokenizer/nets.py at 024447c.
TINY_STATE_DICT_BEFORE_REGISTRY = """
    encoder.conv_in.weight 32x3x3x3
    encoder.conv_in.bias 32
    encoder.levels.0.0.norm1.weight 32
    encoder.levels.0.0.norm1.bias 32
    encoder.levels.0.0.conv1.weight 32x32x3x3
    encoder.levels.0.0.conv1.bias 32
    encoder.levels.0.0.norm2.weight 32
    encoder.levels.0.0.norm2.bias 32
    encoder.levels.0.0.conv2.weight 32x32x3x3
    encoder.levels.0.0.conv2.bias 32
    encoder.levels.0.1.weight 32x32x3x3
    encoder.levels.0.1.bias 32
    encoder.levels.1.0.norm1.weight 32
    encoder.levels.1.0.norm1.bias 32
    encoder.levels.1.0.conv1.weight 64x32x3x3
    encoder.levels.1.0.conv1.bias 64
    encoder.levels.1.0.norm2.weight 64
    encoder.levels.1.0.norm2.bias 64
    encoder.levels.1.0.conv2.weight 64x64x3x3
    encoder.levels.1.0.conv2.bias 64
    encoder.levels.1.0.shortcut.weight 64x32x1x1
    encoder.levels.1.0.shortcut.bias 64
    encoder.levels.1.1.weight 64x64x3x3
    encoder.levels.1.1.bias 64
    encoder.levels.2.0.norm1.weight 64
    encoder.levels.2.0.norm1.bias 64
    encoder.levels.2.0.conv1.weight 64x64x3x3
    encoder.levels.2.0.conv1.bias 64
    encoder.levels.2.0.norm2.weight 64
    encoder.levels.2.0.norm2.bias 64
    encoder.levels.2.0.conv2.weight 64x64x3x3
    encoder.levels.2.0.conv2.bias 64
    encoder.mid.0.norm1.weight 64
    encoder.mid.0.norm1.bias 64
    encoder.mid.0.conv1.weight 64x64x3x3
    encoder.mid.0.conv1.bias 64
    encoder.mid.0.norm2.weight 64
    encoder.mid.0.norm2.bias 64
    encoder.mid.0.conv2.weight 64x64x3x3
    encoder.mid.0.conv2.bias 64
    encoder.norm_out.weight 64
    encoder.norm_out.bias 64
    encoder.conv_out.weight 32x64x1x1
    encoder.conv_out.bias 32
    quantizer.frozen_codebook 1024x32
    quantizer.proj.weight 32x32
    quantizer.proj.bias 32
    decoder.conv_in.weight 64x32x3x3
    decoder.conv_in.bias 64
    decoder.mid.0.norm1.weight 64
    decoder.mid.0.norm1.bias 64
    decoder.mid.0.conv1.weight 64x64x3x3
    decoder.mid.0.conv1.bias 64
    decoder.mid.0.norm2.weight 64
    decoder.mid.0.norm2.bias 64
    decoder.mid.0.conv2.weight 64x64x3x3
    decoder.mid.0.conv2.bias 64
    decoder.levels.0.0.norm1.weight 64
    decoder.levels.0.0.norm1.bias 64
    decoder.levels.0.0.conv1.weight 64x64x3x3
    decoder.levels.0.0.conv1.bias 64
    decoder.levels.0.0.norm2.weight 64
    decoder.levels.0.0.norm2.bias 64
    decoder.levels.0.0.conv2.weight 64x64x3x3
    decoder.levels.0.0.conv2.bias 64
    decoder.levels.0.1.conv.weight 256x64x3x3
    decoder.levels.0.1.conv.bias 256
    decoder.levels.1.0.norm1.weight 64
    decoder.levels.1.0.norm1.bias 64
    decoder.levels.1.0.conv1.weight 64x64x3x3
    decoder.levels.1.0.conv1.bias 64
    decoder.levels.1.0.norm2.weight 64
    decoder.levels.1.0.norm2.bias 64
    decoder.levels.1.0.conv2.weight 64x64x3x3
    decoder.levels.1.0.conv2.bias 64
    decoder.levels.1.1.conv.weight 256x64x3x3
    decoder.levels.1.1.conv.bias 256
    decoder.levels.2.0.norm1.weight 64
    decoder.levels.2.0.norm1.bias 64
    decoder.levels.2.0.conv1.weight 32x64x3x3
    decoder.levels.2.0.conv1.bias 32
    decoder.levels.2.0.norm2.weight 32
    decoder.levels.2.0.norm2.bias 32
    decoder.levels.2.0.conv2.weight 32x32x3x3
    decoder.levels.2.0.conv2.bias 32
    decoder.levels.2.0.shortcut.weight 32x64x1x1
    decoder.levels.2.0.shortcut.bias 32
    decoder.norm_out.weight 32
    decoder.norm_out.bias 32
    decoder.conv_out.weight 3x32x3x3
    decoder.conv_out.bias 3
"""


def test_net_overrides_replace_single_fields_and_refuse_typos():
    """TokenizerConfig.net: widths no preset has (a converted checkpoint's), checked by name and type."""
    from tokenizer import TokenizerConfig, build_tokenizer
    cfg = TokenizerConfig(size="tiny", net={"ch": 16, "ch_mult": [1, 2], "conv_bias": False, "norm_groups": 8})
    model = build_tokenizer(cfg)
    assert model.downsample_factor == 2 and model.encoder.conv_in.weight.shape[0] == 16
    assert model.encoder.conv_in.bias is None and model.encoder.levels[0][0].conv1.bias is None
    assert model.decoder.conv_in.bias is not None  # the official decoder keeps this bias
    assert {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)} == {8}
    assert build_tokenizer(TokenizerConfig(size="tiny")).encoder.levels[0][0].norm1.num_groups == 8  # 32 ch // 4
    with pytest.raises(KeyError, match="unknown field 'chan'.*choose from"):
        build_tokenizer(TokenizerConfig(size="tiny", net={"chan": 16}))
    with pytest.raises(TypeError, match="net.conv_bias.*expected a bool"):
        build_tokenizer(TokenizerConfig(size="tiny", net={"conv_bias": 0}))
    with pytest.raises(ValueError, match="norm_groups=7 does not divide"):
        build_tokenizer(TokenizerConfig(size="tiny", net={"norm_groups": 7}))
