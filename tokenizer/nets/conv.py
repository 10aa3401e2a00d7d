"""The `conv` architecture: convolutional encoder and decoder (Open-MAGVIT2 style, no attention).

SimVQ (arXiv 2411.02038, §3 of docs/SIMVQ_SPEC.md) uses the Open-MAGVIT2 "B" network:
ResBlocks of GroupNorm -> swish -> conv3x3, a stride-2 conv per downsampling level, and a
decoder that upsamples with conv -> pixel-shuffle. The same classes serve images (dims=2)
and audio (dims=1): only the conv / pixel-shuffle flavour changes, never the code.

Sizes are names in `NET_SIZES`; the downsampling factor is f = 2 ** (len(ch_mult) - 1)
per spatial axis, so an input of shape (B, C, *S) becomes a latent grid (B, z_channels, *S/f).
Registered as `tokenizer.nets.ARCHS["conv"]` through `build_nets`. Module names and the order in
which parameters are created are load-bearing: checkpoint keys and same-seed weights depend on them.
"""

from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F


@dataclass(frozen=True)
class NetConfig:
    ch: int = 128                         # channels of the first level
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)  # channel multiplier per level; f = 2 ** (len - 1)
    num_res_blocks: int = 2               # ResBlocks per level (and in the middle)
    z_channels: int = 128                 # latent channels = codebook dim d
    # The official SimVQ nets (tokenizer/official/image.py) differ in two details the presets keep: no bias on
    # conv_in and on the ResBlock convs (GroupNorm follows each, so a bias there is redundant), and GroupNorm
    # always with 32 groups. norm_groups = 0 keeps the project's rule (32, fewer on narrow layers).
    conv_bias: bool = True                # bias on the encoder's conv_in and on every ResBlock conv and shortcut
    norm_groups: int = 0                  # GroupNorm groups; 0 = min(32, channels // 4), dividing channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


NET_SIZES: dict[str, NetConfig] = {
    # 16x16 digits -> 4x4 grid (16 tokens); trains on a laptop CPU in minutes.
    "tiny": NetConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32),
    # 32x32 images -> 8x8 grid; a step up for CIFAR-sized experiments on CPU.
    "s": NetConfig(ch=64, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=64),
    # The paper's image tokenizer (Open-MAGVIT2 "B"): 128x128 -> 16x16 tokens.
    "b": NetConfig(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, z_channels=128),
    # Audio-leaning (use with dims=1): hop 64 samples, cheap 1-D convs, wide latent.
    "audio-s": NetConfig(ch=32, ch_mult=(1, 2, 2, 4, 4, 8, 8), num_res_blocks=1, z_channels=128),
}


def get_net_config(size: str) -> NetConfig:
    if size not in NET_SIZES:
        raise KeyError(f"unknown tokenizer size {size!r} (setting `size`); choose one of {sorted(NET_SIZES)}")
    return NET_SIZES[size]


def conv(dims: int, c_in: int, c_out: int, kernel: int, stride: int = 1, padding: int = 0,
         bias: bool = True) -> nn.Module:
    if dims not in (1, 2):
        raise ValueError(f"dims={dims} is not supported (setting `dims`): use 1 for audio or 2 for images")
    cls = nn.Conv1d if dims == 1 else nn.Conv2d
    return cls(c_in, c_out, kernel, stride=stride, padding=padding, bias=bias)


def group_norm(channels: int, groups: int = 0) -> nn.GroupNorm:
    """GroupNorm(eps 1e-6) with exactly `groups` groups, or with groups = 0 the project's rule: the paper's 32, but
    small nets (ch=32 with 32 groups = 1 channel/group, i.e. instance norm) get fewer so each group still pools
    several channels."""
    if groups:
        if channels % groups:
            raise ValueError(f"norm_groups={groups} does not divide a layer of {channels} channels (setting "
                             f"`net.norm_groups`); pick a divisor of every width, or 0 for the automatic rule")
    else:
        groups = min(32, max(1, channels // 4))
        while channels % groups:
            groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


class PixelShuffle1d(nn.Module):
    """1-D pixel shuffle: (B, C*r, T) -> (B, C, T*r), the sub-pixel upsampling of audio."""

    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, Cr, T = x.shape
        r = self.factor
        x = x.view(B, Cr // r, r, T)  # (B, C, r, T): channel c*r + i holds phase i
        x = x.permute(0, 1, 3, 2)  # (B, C, T, r)
        return x.reshape(B, Cr // r, T * r)  # (B, C, T*r): output t*r + i = phase i of step t


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dims: int, cfg: NetConfig):
        super().__init__()
        bias, groups = cfg.conv_bias, cfg.norm_groups
        self.norm1 = group_norm(c_in, groups)
        self.conv1 = conv(dims, c_in, c_out, 3, padding=1, bias=bias)
        self.norm2 = group_norm(c_out, groups)
        self.conv2 = conv(dims, c_out, c_out, 3, padding=1, bias=bias)
        self.shortcut = conv(dims, c_in, c_out, 1, bias=bias) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class Upsample(nn.Module):
    """conv -> pixel-shuffle: each output position gets its own learned filter (no checkerboard
    from transposed convs, no fixed interpolation)."""

    def __init__(self, channels: int, dims: int):
        super().__init__()
        self.conv = conv(dims, channels, channels * 2**dims, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2) if dims == 2 else PixelShuffle1d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(x))


def _check_spatial(x: torch.Tensor, dims: int, factor: int, what: str) -> None:
    if x.dim() != dims + 2:
        raise ValueError(f"{what} expects a (B, C, {'T' if dims == 1 else 'H, W'}) tensor for dims={dims}, "
                         f"got shape {tuple(x.shape)}")
    bad = [s for s in x.shape[2:] if s % factor]
    if bad:
        raise ValueError(f"{what}: spatial shape {tuple(x.shape[2:])} is not divisible by the downsampling "
                         f"factor {factor}; crop/pad the input or pick another `size`")


class Encoder(nn.Module):
    """(B, in_channels, *S) -> (B, z_channels, *S/f)."""

    def __init__(self, cfg: NetConfig, in_channels: int = 3, dims: int = 2):
        super().__init__()
        self.cfg, self.dims = cfg, dims
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = conv(dims, in_channels, widths[0], 3, padding=1, bias=cfg.conv_bias)
        self.levels = nn.ModuleList()
        c = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, w, dims, cfg))
                c = w
            if i < len(widths) - 1:
                blocks.append(conv(dims, c, c, 3, stride=2, padding=1))  # halves each even axis exactly
            self.levels.append(nn.Sequential(*blocks))
        self.mid = nn.Sequential(*[ResBlock(c, c, dims, cfg) for _ in range(cfg.num_res_blocks)])
        self.norm_out = group_norm(c, cfg.norm_groups)
        self.conv_out = conv(dims, c, cfg.z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_spatial(x, self.dims, self.cfg.downsample_factor, "Encoder")
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, *G) -> (B, out_channels, *G*f); mirror of the encoder."""

    def __init__(self, cfg: NetConfig, out_channels: int = 3, dims: int = 2):
        super().__init__()
        self.cfg, self.dims = cfg, dims
        widths = [cfg.ch * m for m in cfg.ch_mult]
        c = widths[-1]
        self.conv_in = conv(dims, cfg.z_channels, c, 3, padding=1)
        self.mid = nn.Sequential(*[ResBlock(c, c, dims, cfg) for _ in range(cfg.num_res_blocks)])
        self.levels = nn.ModuleList()
        for i in reversed(range(len(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(c, widths[i], dims, cfg))
                c = widths[i]
            if i > 0:
                blocks.append(Upsample(c, dims))
            self.levels.append(nn.Sequential(*blocks))
        self.norm_out = group_norm(c, cfg.norm_groups)
        self.conv_out = conv(dims, c, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_spatial(z, self.dims, 1, "Decoder")
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def build_nets(cfg: NetConfig, dims: int, in_channels: int) -> tuple[Encoder, Decoder]:
    """(encoder, decoder) of one size; the encoder is created first (the seeded weights depend on the order)."""
    return Encoder(cfg, in_channels=in_channels, dims=dims), Decoder(cfg, out_channels=in_channels, dims=dims)
