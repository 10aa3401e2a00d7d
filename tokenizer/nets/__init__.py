"""Encoder/decoder architectures of the tokenizer, by name: `ARCHS[arch]` builds the pair for a named size.

    arch = get_arch("conv")                                  # KeyError listing the registered names otherwise
    encoder, decoder = arch.build("tiny", dims=2, in_channels=3)
    arch.latent_channels("tiny")    # 32: the quantizer's dim
    arch.downsample_factor("tiny")  # 4: input samples per token along each axis (the hop, for audio)

Each arch keeps its own size registry, because sizes of different families share no fields (a conv net has
`ch_mult`, a SEANet encoder has stride `ratios`). The registry only asks a size config for two numbers,
`z_channels` and `downsample_factor`, and asks the arch for one function, `build_nets(cfg, dims, in_channels)`.
Adding an architecture (e.g. the paper's audio tokenizer: a SEANet encoder with a Vocos decoder) is one new module
with its sizes and its `build_nets`, plus one entry here; the `conv` code stays untouched.
"""

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

from torch import nn

from . import conv
from .conv import NET_SIZES, Decoder, Encoder, NetConfig, get_net_config


class SizeConfig(Protocol):
    """What the registry needs from an arch's size config (a frozen dataclass in practice)."""

    z_channels: int  # latent channels = the quantizer's dim

    @property
    def downsample_factor(self) -> int: ...  # input samples per token along each axis (the hop, for audio)


@dataclass(frozen=True)
class Arch:
    name: str                              # the key in ARCHS, for error messages
    sizes: Mapping[str, SizeConfig]        # size name -> this arch's own config
    # (size config, dims, in_channels) -> (encoder, decoder); the decoder outputs in_channels channels.
    build_nets: Callable[[SizeConfig, int, int], tuple[nn.Module, nn.Module]]

    def size(self, size: str) -> SizeConfig:
        if size not in self.sizes:
            raise KeyError(f"unknown tokenizer size {size!r} for arch {self.name!r} (setting `size`); "
                           f"choose one of {sorted(self.sizes)}")
        return self.sizes[size]

    def build(self, size: str, dims: int, in_channels: int) -> tuple[nn.Module, nn.Module]:
        return self.build_nets(self.size(size), dims, in_channels)

    def latent_channels(self, size: str) -> int:
        return self.size(size).z_channels

    def downsample_factor(self, size: str) -> int:
        return self.size(size).downsample_factor


ARCHS: dict[str, Arch] = {
    # Open-MAGVIT2-style conv nets, 2-D for images and 1-D for audio (tokenizer/nets/conv.py).
    "conv": Arch("conv", conv.NET_SIZES, conv.build_nets),
}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise KeyError(f"unknown tokenizer arch {name!r} (setting `arch`); choose one of {sorted(ARCHS)}")
    return ARCHS[name]


__all__ = ["ARCHS", "Arch", "SizeConfig", "get_arch",
           "NET_SIZES", "Decoder", "Encoder", "NetConfig", "get_net_config"]
