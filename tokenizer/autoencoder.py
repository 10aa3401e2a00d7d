"""The tokenizer: encoder -> quantizer -> decoder, composed from injected parts (as EnCodec's model).

    ae = build_tokenizer(TokenizerConfig(size="tiny", num_codes=1024))
    codes = ae.encode(x)        # (B, *grid) int64
    x_hat = ae.decode(codes)    # no quantizing inside decode: codes -> quantizer.decode_codes -> decoder
    out = ae(x)                 # AEOutput(x_hat, codes, losses={"vq/commit": ...})

Any quantizer registered in `tokenizer.quantizers` plugs in; its dim is the net's z_channels.
"""

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .nets import get_arch
from .quantizers import build_quantizer
from .quantizers.options import (OPTIONS, EMAVQOptions, FSQOptions, LFQOptions, SimVQOptions, VQOptions,
                                 quantizer_kwargs)


@dataclass
class TokenizerConfig:
    arch: str = "conv"            # encoder/decoder family, a key of tokenizer.nets.ARCHS (conv | seanet-vocos)
    size: str = "tiny"            # a size of that arch (conv: tiny, s, b, audio-s; seanet-vocos: paper, cpu)
    # Single fields of that size replaced, e.g. {"ch": 32, "conv_bias": false}: widths no preset has (a converted
    # official checkpoint records its own here). Empty = the preset as it is.
    net: dict[str, Any] = field(default_factory=dict)
    dims: int = 2                 # 2 = images (B, C, H, W); 1 = audio (B, C, T)
    in_channels: int = 3          # 3 for RGB, 1 for mono audio / grayscale
    quantizer: str = "simvq"      # name in tokenizer.quantizers.QUANTIZERS
    num_codes: int = 1024         # codebook size K
    # The options of each quantizer (only the chosen one's are used); defaults = the paper's / the library's.
    simvq: SimVQOptions = field(default_factory=SimVQOptions)
    vq: VQOptions = field(default_factory=VQOptions)
    ema_vq: EMAVQOptions = field(default_factory=EMAVQOptions)
    fsq: FSQOptions = field(default_factory=FSQOptions)
    lfq: LFQOptions = field(default_factory=LFQOptions)

    def quantizer_options(self) -> dict[str, Any]:
        """Keyword arguments for the chosen quantizer, from its section."""
        if self.quantizer not in OPTIONS:
            raise ValueError(f"unknown quantizer {self.quantizer!r} (setting `quantizer`); choose one of "
                             f"{sorted(OPTIONS)}")
        return quantizer_kwargs(self.quantizer, getattr(self, OPTIONS[self.quantizer][0]))


def upgrade_tokenizer_config(config: dict) -> dict:
    """A tokenizer config dict as written by older versions -> today's fields: the untyped `quantizer_kwargs` dict
    became the chosen quantizer's typed section (so checkpoints written before still load)."""
    config = dict(config)
    legacy = config.pop("quantizer_kwargs", None)
    if legacy:
        section = OPTIONS.get(config.get("quantizer", "simvq"), ("simvq",))[0]
        config[section] = {**config.get(section, {}), **legacy}
    return config


class AEOutput(NamedTuple):
    x_hat: torch.Tensor               # (B, C, *S) reconstruction
    codes: torch.Tensor               # (B, *grid) int64
    losses: dict[str, torch.Tensor]   # {"vq/commit": scalar}, weighted later by the training config


class VQAutoencoder(nn.Module):
    def __init__(self, encoder: nn.Module, quantizer: nn.Module, decoder: nn.Module, downsample_factor: int):
        super().__init__()
        self.encoder = encoder
        self.quantizer = quantizer
        self.decoder = decoder
        self.downsample_factor = downsample_factor

    def grid_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Token grid for an input's spatial shape, e.g. (16, 16) -> (4, 4); a full (B, C, *S) shape is
        accepted too (batch and channel dims are dropped)."""
        spatial = tuple(input_shape)
        dims = getattr(self.encoder, "dims", None)
        if dims is not None and len(spatial) == dims + 2:
            spatial = spatial[2:]
        f = self.downsample_factor
        if any(s % f for s in spatial):
            raise ValueError(f"input shape {spatial} is not divisible by the downsampling factor {f}")
        return tuple(s // f for s in spatial)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quantizer(self.encoder(x)).codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.quantizer.decode_codes(codes))

    def forward(self, x: torch.Tensor) -> AEOutput:
        q = self.quantizer(self.encoder(x))
        return AEOutput(x_hat=self.decoder(q.z_q), codes=q.codes, losses={"vq/commit": q.loss})


def build_tokenizer(cfg: TokenizerConfig) -> VQAutoencoder:
    arch = get_arch(cfg.arch)
    size = arch.size(cfg.size, cfg.net)  # checks the size and its overrides before anything is built
    # The quantizer is built before the nets: the seeded initial weights depend on this order.
    quantizer = build_quantizer(cfg.quantizer, dim=size.z_channels, num_codes=cfg.num_codes,
                                **cfg.quantizer_options())
    encoder, decoder = arch.build_nets(size, cfg.dims, cfg.in_channels)
    return VQAutoencoder(encoder, quantizer, decoder, downsample_factor=size.downsample_factor)
