"""Encoder/decoder shapes for every registered size in 1-D and 2-D, the autoencoder round trip, a tiny overfit."""

import pytest
import torch

from tokenizer import NET_SIZES, TokenizerConfig, build_tokenizer
from tokenizer.nets import Decoder, Encoder, PixelShuffle1d, group_norm


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
