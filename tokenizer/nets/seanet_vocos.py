"""The `seanet-vocos` arch: the paper's audio tokenizer (SimVQ `configs/libritts_24khz.yaml`, docs/AUDIO_SPEC §1).

    waveform (B, 1, T) --SeanetEncoder--> (B, D, T/hop) --SimVQ--> (B, D, T/hop) --VocosDecoder--> (B, 1, T)

- Encoder: EnCodec's SEANet. A k7 conv, then per level a residual unit (ELU -> conv k3 to C/2 -> ELU -> 1x1 conv back
  to C, plus a 1x1 conv shortcut) and ELU -> strided conv (kernel 2*stride) doubling C; a 2-layer LSTM with a skip;
  ELU -> k7 conv to D. Every conv pads itself by EnCodec's `SConv1d` rule (`PaddedConv1d`), reflect mode.
- Decoder: the Vocos backbone of WavTokenizer (k7 embed -> `pos_net` of ResNet blocks around one self-attention ->
  LayerNorm -> ConvNeXt blocks -> LayerNorm), then an iSTFT head: a Linear to log-magnitude and phase of
  n_fft/2 + 1 bins per frame, inverted with "same" padding so that T/hop frames give exactly T samples.
Module names below `decoder.backbone` are the official ones, so a converted checkpoint (tokenizer/official/audio.py)
maps there one to one; the encoder gets readable names (the official one is a flat `model.{i}` Sequential).
Registered as `tokenizer.nets.ARCHS["seanet-vocos"]`; 1-D mono only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as apply_weight_norm

from .conv import _check_spatial

DROPOUT = 0.1       # pos_net ResNet blocks (the official value; training only)
NORM_GROUPS = 32    # pos_net GroupNorm, the official taming `Normalize`
DILATION_BASE = 2   # residual unit j of a level has dilation 2**j (EnCodec); the paper has one unit, dilation 1


@dataclass(frozen=True)
class SeanetVocosConfig:
    n_filters: int = 32                      # SEANet width of the first level; level i has n_filters * 2**i channels
    strides: tuple[int, ...] = (2, 4, 5, 8)  # encoder strides in order (EnCodec's `ratios` reversed); hop = product
    z_channels: int = 512                    # latent channels D = the quantizer's dim
    causal: bool = True                      # EnCodec causal padding (all on the left); False pads both sides
    residual_layers: int = 1                 # residual units per level
    lstm_layers: int = 2                     # LSTM layers at the end of the encoder (0 = none)
    # Weight norm on every encoder conv (EnCodec trains with it). A converted official checkpoint has it folded into
    # plain weights (w = g * v / ||v||) and sets this off: the forward is the same, the parameters are fewer.
    weight_norm: bool = True
    dim: int = 768                           # Vocos width
    intermediate_dim: int = 2304             # ConvNeXt hidden width
    num_layers: int = 12                     # ConvNeXt blocks
    n_fft: int = 1280                        # iSTFT size = window length; its hop is the encoder's hop

    @property
    def downsample_factor(self) -> int:
        return math.prod(self.strides)


SIZES: dict[str, SeanetVocosConfig] = {
    # The released configuration: 24 kHz, hop 320 = 75 tokens/s; 8.8 M encoder + 61.9 M backbone + 1.0 M head.
    "paper": SeanetVocosConfig(),
    # Trains on a 2-core CPU, for 16 kHz audio (hop 320 = 50 tokens/s): 6.0 M parameters (2.0 M encoder, half of it
    # the LSTM; 3.7 M backbone; 0.33 M head). One fwd+bwd of 4 x 1 s (16,000 samples) with the commitment loss:
    # 0.55-0.8 s on one thread (median of 5, the 2 cores shared with other jobs, load 3-6; two threads took 3 s there).
    "cpu": SeanetVocosConfig(n_filters=16, z_channels=128, dim=256, intermediate_dim=768, num_layers=4),
}


# ---------------------------------------------------------------------------------------------------------- encoder

def encodec_padding(length: int, kernel: int, stride: int, dilation: int, causal: bool) -> tuple[int, int]:
    """(left, right) padding of EnCodec's `SConv1d` for an input of `length` samples.

    The fixed padding is k_eff - stride (k_eff = (kernel - 1) * dilation + 1): all on the left when causal, else split
    with the extra sample on the left. On top, EnCodec pads the right so the last window is full; with the fixed
    padding above its formula ((ceil(n_frames) - 1) * stride + k_eff - padding - length) reduces to the distance to
    the next multiple of the stride, so the output has ceil(length / stride) frames.
    """
    total = (kernel - 1) * dilation + 1 - stride
    extra = -length % stride
    if causal:
        return total, extra
    right = total // 2
    return total - right, right + extra


def reflect_pad(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Reflect padding that also works on inputs no longer than the padding (EnCodec's `pad1d`): such an input is first
    extended with zeros on the right, and those zeros are cut off again after reflecting."""
    length = x.shape[-1]
    short = max(left, right) - length + 1 if length <= max(left, right) else 0
    if short:
        x = F.pad(x, (0, short))
    x = F.pad(x, (left, right), mode="reflect")
    return x[..., :x.shape[-1] - short] if short else x


class PaddedConv1d(nn.Conv1d):
    """Conv1d that pads its input itself by the `encodec_padding` rule, reflect mode (EnCodec's `SConv1d`)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1, causal: bool = True):
        super().__init__(c_in, c_out, kernel, stride=stride, dilation=dilation)
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = encodec_padding(x.shape[-1], self.kernel_size[0], self.stride[0], self.dilation[0], self.causal)
        return super().forward(reflect_pad(x, left, right))


class ResidualUnit(nn.Module):
    """SEANet residual unit: ELU -> conv k3 (C -> C/2, dilated) -> ELU -> 1x1 conv (C/2 -> C), plus a 1x1 shortcut."""

    def __init__(self, channels: int, dilation: int, causal: bool):
        super().__init__()
        self.conv1 = PaddedConv1d(channels, channels // 2, 3, dilation=dilation, causal=causal)
        self.conv2 = PaddedConv1d(channels // 2, channels, 1, causal=causal)
        self.shortcut = PaddedConv1d(channels, channels, 1, causal=causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.conv2(F.elu(self.conv1(F.elu(x))))


class EncoderLevel(nn.Module):
    """Residual units at one resolution, then ELU -> strided conv (kernel 2 * stride) doubling the channels."""

    def __init__(self, channels: int, stride: int, cfg: SeanetVocosConfig):
        super().__init__()
        self.res = nn.ModuleList([ResidualUnit(channels, DILATION_BASE ** j, cfg.causal)
                                  for j in range(cfg.residual_layers)])
        self.down = PaddedConv1d(channels, 2 * channels, 2 * stride, stride=stride, causal=cfg.causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for unit in self.res:
            x = unit(x)
        return self.down(F.elu(x))


class SeanetEncoder(nn.Module):
    """(B, 1, T) -> (B, D, T / hop), T a multiple of the hop.

    With `causal`, latent frame n depends on samples < (n + 1) * hop only, except at the very start: reflect padding
    mirrors what follows into the left padding, and at the last k7 conv that reaches 6 frames ahead, so frames 0-5
    see samples up to 7 * hop. EnCodec's causal encoder (reflect mode) behaves the same way.
    """

    def __init__(self, cfg: SeanetVocosConfig):
        super().__init__()
        self.cfg, self.dims = cfg, 1  # `dims` is read by VQAutoencoder.grid_shape
        c = cfg.n_filters
        self.conv_in = PaddedConv1d(1, c, 7, causal=cfg.causal)
        self.levels = nn.ModuleList()
        for stride in cfg.strides:
            self.levels.append(EncoderLevel(c, stride, cfg))
            c *= 2
        self.lstm = nn.LSTM(c, c, cfg.lstm_layers) if cfg.lstm_layers else None
        self.conv_out = PaddedConv1d(c, cfg.z_channels, 7, causal=cfg.causal)
        if cfg.weight_norm:
            for m in self.modules():
                if isinstance(m, PaddedConv1d):
                    apply_weight_norm(m, dim=0)  # g (C_out, 1, 1), v like the weight: EnCodec's parametrisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_spatial(x, 1, self.cfg.downsample_factor, "SeanetEncoder")
        if x.shape[1] != 1:
            raise ValueError(f"SeanetEncoder expects mono audio (B, 1, T), got shape {tuple(x.shape)}")
        h = self.conv_in(x)
        for level in self.levels:
            h = level(h)
        if self.lstm is not None:
            seq = h.permute(2, 0, 1)  # (B, C, T') -> (T', B, C): nn.LSTM's sequence-first layout
            h = (self.lstm(seq)[0] + seq).permute(1, 2, 0)  # skip connection; back to (B, C, T')
        return self.conv_out(F.elu(h))


# ---------------------------------------------------------------------------------------------------------- decoder

def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(NORM_GROUPS, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """pos_net block: GroupNorm -> swish -> conv k3 -> GroupNorm -> swish -> dropout -> conv k3, plus the input."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = group_norm(channels)
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1)
        self.norm2 = group_norm(channels)
        self.dropout = nn.Dropout(DROPOUT)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(self.dropout(F.silu(self.norm2(h))))


class AttnBlock(nn.Module):
    """Single-head self-attention over time with 1x1-conv q, k, v and output projection, scale C^-0.5, residual."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv1d(channels, channels, 1)
        self.k = nn.Conv1d(channels, channels, 1)
        self.v = nn.Conv1d(channels, channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (proj(h).transpose(1, 2) for proj in (self.q, self.k, self.v))  # each (B, T, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, T, C); default scale = C^-0.5
        return x + self.proj_out(h.transpose(1, 2))


class ConvNeXtBlock(nn.Module):
    """Depthwise conv k7 -> LayerNorm -> Linear -> GELU -> Linear -> per-channel layer scale, plus the input."""

    def __init__(self, dim: int, intermediate_dim: int, layer_scale: float):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.dwconv(x).transpose(1, 2))  # (B, C, T) -> (B, T, C)
        h = self.gamma * self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + h.transpose(1, 2)


class VocosBackbone(nn.Module):
    """(B, D, T') -> (B, T', dim): the time resolution is kept."""

    def __init__(self, cfg: SeanetVocosConfig):
        super().__init__()
        dim = cfg.dim
        self.embed = nn.Conv1d(cfg.z_channels, dim, 7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.convnext = nn.ModuleList([ConvNeXtBlock(dim, cfg.intermediate_dim, 1 / cfg.num_layers)
                                       for _ in range(cfg.num_layers)])
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        # Vocos' init (trunc-normal 0.02, zero bias) reaches the modules above only: the official pos_net is created
        # after it and keeps PyTorch's default init.
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.pos_net = nn.Sequential(ResnetBlock(dim), ResnetBlock(dim), AttnBlock(dim),
                                     ResnetBlock(dim), ResnetBlock(dim), group_norm(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.pos_net(self.embed(z))
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)  # LayerNorm over channels
        for block in self.convnext:
            h = block(h)
        return self.final_layer_norm(h.transpose(1, 2))  # (B, T', dim)


class ISTFTHead(nn.Module):
    """(B, T', dim) -> (B, T' * hop): Linear to log-magnitude and phase, then an inverse STFT with "same" padding.

    torch.istft(center=True) would drop n_fft/2 samples per side and its NOLA check fails at the un-padded edges;
    Vocos instead overlap-adds all frames, divides by the squared-window envelope and trims (n_fft - hop)/2 per side,
    which leaves exactly T' * hop samples.
    """

    ema_constant_buffers = ("window",)  # a fixed Hann window: pipelines.ema neither averages nor copies it

    def __init__(self, dim: int, n_fft: int, hop: int):
        super().__init__()
        self.n_fft, self.hop = n_fft, hop
        self.out = nn.Linear(dim, n_fft + 2)  # n_fft/2 + 1 log-magnitudes, then as many phases
        # Derived from n_fft, so not saved (an official checkpoint's copy is checked and dropped at conversion).
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.out(h).transpose(1, 2)  # (B, n_fft + 2, T')
        log_mag, phase = x.chunk(2, dim=1)  # each (B, n_fft/2 + 1, T')
        mag = log_mag.exp().clamp(max=1e2)  # the official safeguard against huge magnitudes
        return self.istft(torch.complex(mag * phase.cos(), mag * phase.sin()))

    def istft(self, spec: torch.Tensor) -> torch.Tensor:
        """Complex (B, n_fft/2 + 1, T') -> (B, T' * hop)."""
        frames = spec.shape[-1]
        length = (frames - 1) * self.hop + self.n_fft  # every frame overlap-added, before trimming
        pad = (self.n_fft - self.hop) // 2
        segments = torch.fft.irfft(spec, self.n_fft, dim=1) * self.window[:, None]  # (B, n_fft, T')

        def overlap_add(cols: torch.Tensor) -> torch.Tensor:  # (N, n_fft, T') -> (N, length)
            return F.fold(cols, (1, length), kernel_size=(1, self.n_fft), stride=(1, self.hop))[:, 0, 0]

        y = overlap_add(segments)
        envelope = overlap_add(self.window.square()[None, :, None].expand(1, -1, frames))[0]  # (length,)
        keep = slice(pad, pad + frames * self.hop)
        return y[:, keep] / envelope[keep]


class VocosDecoder(nn.Module):
    """(B, D, T') -> (B, 1, T' * hop): `backbone` then `head`."""

    def __init__(self, cfg: SeanetVocosConfig):
        super().__init__()
        self.dims = 1
        self.backbone = VocosBackbone(cfg)
        self.head = ISTFTHead(cfg.dim, cfg.n_fft, cfg.downsample_factor)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_spatial(z, 1, 1, "VocosDecoder")
        return self.head(self.backbone(z)).unsqueeze(1)


def check_config(cfg: SeanetVocosConfig) -> None:
    """Settings the nets cannot run with, as one-line errors naming the setting."""
    hop = cfg.downsample_factor
    if cfg.n_fft < hop or (cfg.n_fft - hop) % 2:
        raise ValueError(f"net.n_fft={cfg.n_fft} must be at least the hop {hop} and differ from it by an even number: "
                         f"the iSTFT trims (n_fft - hop)/2 samples per side")
    # The kept samples of one frame already have a non-vanishing squared-window envelope (more frames only add to
    # it), so the division by the envelope is safe at any length (the official code asserts > 1e-11 at run time).
    pad = (cfg.n_fft - hop) // 2
    if torch.hann_window(cfg.n_fft, device="cpu")[pad:pad + hop].square().min() <= 1e-11:  # also under `meta`
        raise ValueError(f"net.n_fft={cfg.n_fft} with hop {hop}: the Hann windows do not overlap enough to invert")
    if cfg.dim % NORM_GROUPS:
        raise ValueError(f"net.dim={cfg.dim} must be a multiple of {NORM_GROUPS} (the pos_net GroupNorm groups)")
    if cfg.n_filters % 2:
        raise ValueError(f"net.n_filters={cfg.n_filters} must be even (the residual units halve it)")


def build_nets(cfg: SeanetVocosConfig, dims: int, in_channels: int) -> tuple[SeanetEncoder, VocosDecoder]:
    if dims != 1:
        raise ValueError(f"arch 'seanet-vocos' is for audio: dims={dims} is not supported (setting `dims`); use 1")
    if in_channels != 1:
        raise ValueError(f"arch 'seanet-vocos' takes mono audio: in_channels={in_channels} is not supported "
                         f"(setting `in_channels`); use 1")
    check_config(cfg)
    return SeanetEncoder(cfg), VocosDecoder(cfg)
