"""Encoder/decoder architectures of the tokenizer, by name: `ARCHS[arch]` builds the pair for a named size.

    arch = get_arch("conv")                                  # KeyError listing the registered names otherwise
    encoder, decoder = arch.build("tiny", dims=2, in_channels=3)
    arch.latent_channels("tiny")    # 32: the quantizer's dim
    arch.downsample_factor("tiny")  # 4: input samples per token along each axis (the hop, for audio)

Each arch keeps its own size registry, because sizes of different families share no fields (a conv net has
`ch_mult`, a SEANet encoder has stride `ratios`). The registry only asks a size config for two numbers,
`z_channels` and `downsample_factor`, and asks the arch for one function, `build_nets(cfg, dims, in_channels)`.
A tokenizer config may override single fields of a size (`TokenizerConfig.net`, e.g. {"ch": 32, "conv_bias": false}):
how a converted official checkpoint (tokenizer/official/) states widths that no preset has, without new presets.

Adding an architecture (as `seanet-vocos`, the paper's audio tokenizer, was added) is one new module
with its sizes and its `build_nets`, plus one entry here; the `conv` code stays untouched.
"""

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

from torch import nn

from . import conv, seanet_vocos
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

    def size(self, size: str, overrides: Mapping[str, Any] | None = None) -> SizeConfig:
        """The named size's config, with single fields replaced by `overrides` (setting `net`)."""
        if size not in self.sizes:
            raise KeyError(f"unknown tokenizer size {size!r} for arch {self.name!r} (setting `size`); "
                           f"choose one of {sorted(self.sizes)}")
        return override_fields(self.sizes[size], overrides or {}, f"arch {self.name!r} size {size!r}")

    def build(self, size: str, dims: int, in_channels: int,
              overrides: Mapping[str, Any] | None = None) -> tuple[nn.Module, nn.Module]:
        return self.build_nets(self.size(size, overrides), dims, in_channels)

    def latent_channels(self, size: str, overrides: Mapping[str, Any] | None = None) -> int:
        return self.size(size, overrides).z_channels

    def downsample_factor(self, size: str, overrides: Mapping[str, Any] | None = None) -> int:
        return self.size(size, overrides).downsample_factor


def override_fields(base: SizeConfig, overrides: Mapping[str, Any], what: str) -> SizeConfig:
    """`base` with some fields replaced; a list becomes a tuple where the field holds a tuple (JSON has no tuples),
    and a value of the wrong type or an unknown field name is an error naming the setting."""
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    values = {}
    for name, value in overrides.items():
        if name not in fields:
            raise KeyError(f"unknown field {name!r} in setting `net` for {what}; choose from {sorted(fields)}")
        default = fields[name]
        if isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, type(default)):
            raise TypeError(f"setting `net.{name}` = {value!r} for {what}: expected a {type(default).__name__} "
                            f"like the default {default!r}")
        values[name] = value
    return dataclasses.replace(base, **values) if values else base


ARCHS: dict[str, Arch] = {
    # Open-MAGVIT2-style conv nets, 2-D for images and 1-D for audio (tokenizer/nets/conv.py).
    "conv": Arch("conv", conv.NET_SIZES, conv.build_nets),
    # The paper's audio tokenizer: SEANet encoder, Vocos backbone + iSTFT head (tokenizer/nets/seanet_vocos.py).
    "seanet-vocos": Arch("seanet-vocos", seanet_vocos.SIZES, seanet_vocos.build_nets),
}


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise KeyError(f"unknown tokenizer arch {name!r} (setting `arch`); choose one of {sorted(ARCHS)}")
    return ARCHS[name]


__all__ = ["ARCHS", "Arch", "SizeConfig", "get_arch",
           "NET_SIZES", "Decoder", "Encoder", "NetConfig", "get_net_config", "override_fields"]
