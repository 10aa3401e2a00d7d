"""Discriminators, by kind: `DISCRIMINATORS[name](cfg, in_channels, dims) -> nn.Module`.

A discriminator maps (B, C, *S) to logits: one tensor, or a list when it holds several sub-discriminators (the audio
recipe's multi-period and multi-resolution discriminators, whose entries are `Scores(logits, features)`: the hidden
feature maps feature matching needs). A kind may name its objective (class attribute `objective`, a key of
`gan.OBJECTIVES`); one that names none is judged as the PatchGAN. `TokenizerLosses` keeps the ones named in
`LossConfig.discriminators` in a `Discriminators` module (an `nn.ModuleDict` under these names whose forward runs them
all), so new kinds sit beside or instead of the PatchGAN and train as one model with one optimiser.
"""

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .audio_discriminators import build_dac, build_mpd, build_mrd
from .gan import Scores

if TYPE_CHECKING:
    from . import LossConfig


class PatchDiscriminator(nn.Module):
    """pix2pix's NLayerDiscriminator: (B, C, *S) -> patch logits (B, 1, *S'). dims=1 for audio."""

    def __init__(self, in_channels: int = 3, ch: int = 64, n_layers: int = 3, dims: int = 2):
        super().__init__()
        Conv = nn.Conv2d if dims == 2 else nn.Conv1d
        Norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        self.dims, self.n_layers = dims, n_layers
        layers: list[nn.Module] = [Conv(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ch
        for n in range(1, n_layers + 1):
            c_out = ch * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [Conv(c, c_out, 4, stride, 1, bias=False), Norm(c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        layers.append(Conv(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix init: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    @property
    def min_input_size(self) -> int:
        # n_layers stride-2 convs divide by 2**n_layers, then two k4/s1/p1 convs each remove 1.
        return 3 * 2**self.n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[2:]) < self.min_input_size:
            raise ValueError(f"PatchDiscriminator with disc_layers={self.n_layers} needs inputs of at least "
                             f"{self.min_input_size} per axis, got {tuple(x.shape[2:])}; lower `disc_layers`")
        return self.net(x)


def _patch(cfg: "LossConfig", in_channels: int, dims: int) -> nn.Module:
    return PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers, dims)


DISCRIMINATORS: dict[str, Callable[["LossConfig", int, int], nn.Module]] = {
    "patch": _patch,  # PatchGAN with BatchNorm (the image recipe); settings disc_channels, disc_layers
    "mpd": build_mpd,  # HiFi-GAN multi-period (audio); settings mpd_periods, mpd_width
    "mrd": build_mrd,  # UnivNet multi-resolution STFT (audio); settings mrd_resolutions, mrd_width
    "dac": build_dac,  # DAC's MPD + multi-band complex-STFT MRD, least squares (audio); setting dac_width
}


def build_discriminator(name: str, cfg: "LossConfig", in_channels: int, dims: int) -> nn.Module:
    if name not in DISCRIMINATORS:
        raise KeyError(f"unknown discriminator {name!r} (setting `discriminators`); "
                       f"choose from {sorted(DISCRIMINATORS)}")
    return DISCRIMINATORS[name](cfg, in_channels, dims)


class Discriminators(nn.ModuleDict):
    """Every discriminator of a recipe as one module: `forward(x) -> {name: [logits or Scores, ...]}`, in insertion
    order.

    Training calls this module (or its DDP wrapper, from `Trainer.add`) once per input rather than each child
    directly: DDP only all-reduces the gradients of a backward that follows a call to its own forward.
    State dict keys are `<name>.<key>`; `load_state_dict` also takes a single discriminator's keys without the
    prefix when there is exactly one (the `d.safetensors` of checkpoints written before the dict of discriminators).
    """

    def __init__(self, modules: dict[str, nn.Module] | None = None):
        super().__init__(modules)
        self.register_load_state_dict_pre_hook(_add_single_prefix)

    def forward(self, x: torch.Tensor) -> dict[str, list["torch.Tensor | Scores"]]:
        return {name: discriminator_logits(d, x) for name, d in self.items()}


def _add_single_prefix(module: Discriminators, state_dict: dict, prefix: str, *args) -> None:
    """Load-time hook: with exactly one discriminator, keys that lack its `<name>.` prefix get it (in place)."""
    if len(module) != 1:
        return
    name = next(iter(module))
    own = [k for k in state_dict if k.startswith(prefix)]
    if own and not any(k.startswith(f"{prefix}{name}.") for k in own):
        for k in own:
            state_dict[f"{prefix}{name}.{k[len(prefix):]}"] = state_dict.pop(k)


def discriminator_logits(discriminator: nn.Module, x: torch.Tensor) -> list["torch.Tensor | Scores"]:
    """Every logits tensor (or `Scores`) a discriminator returns, as a list (one entry for a PatchGAN)."""
    out = discriminator(x)
    return list(out) if isinstance(out, (list, tuple)) and not isinstance(out, Scores) else [out]
