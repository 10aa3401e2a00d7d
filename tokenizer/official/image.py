"""The official image tokenizer (`taming.models.vq.VQModel`, configs/imagenet_simvq_128_B.yaml) -> the `conv` arch.

The official nets are the project's `conv` nets (the Open-MAGVIT2 "B" layout) with other names and three details:
- names: `down.{i}.block.{j}` / `down.{i}.downsample` -> `levels.{i}.{j}` / `levels.{i}.{num_res_blocks}`;
  `mid_block` -> `mid`; `nin_shortcut` -> `shortcut`; the decoder's `up.{i}` run from the deepest level down, so
  `up.{i}` is `levels.{L-1-i}`, its `upsample.conv1` -> `levels.{L-1-i}.{num_res_blocks}.conv`; `quantize.embedding`
  (the frozen C) -> `quantizer.frozen_codebook`, `quantize.embedding_proj` (W) -> `quantizer.proj`.
- no bias on the encoder's `conv_in` nor on any ResBlock conv or shortcut (`net.conv_bias = false`), and GroupNorm
  with 32 groups at every width (`net.norm_groups = 32`; the project's own presets use fewer on narrow layers).
- the upsampler's depth-to-space is TensorFlow's DCR order: the conv's output channel (i*r + j) * C + c becomes
  output pixel (r*y + i, r*x + j) of channel c, where `nn.PixelShuffle` reads channel c * r^2 + i*r + j; the rows of
  that conv's weight and bias are permuted once at conversion (`dcr_to_pixel_shuffle`).
The released models: ch 128, ch_mult (1, 2, 2, 4), 2 res blocks, z = D = 128, i.e. the `b` size: 128x128 images in
[-1, 1] (short side resized to 128, centre crop) -> 16x16 codes, K = 1,024 / 8,192 / 65,536 / 262,144.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from tokenizer.autoencoder import TokenizerConfig
from tokenizer.nets import get_arch
from tokenizer.quantizers.options import SimVQOptions

PREFIXES = ("encoder.", "decoder.", "quantize.")
NORM_GROUPS = 32  # the official GroupNorm, whatever the width (taming's Normalize)
BASE_SIZE = "b"   # the preset the released models are; a checkpoint's other widths become `net` overrides


def detect(state: Mapping[str, torch.Tensor]) -> bool:
    return "encoder.conv_in.weight" in state and "quantize.embedding_proj.weight" in state and any(
        k.startswith("decoder.up.") for k in state)


def _indices(state: Mapping[str, torch.Tensor], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def infer_config(state: Mapping[str, torch.Tensor]) -> TokenizerConfig:
    """Widths, depth, K and D from the tensor shapes (the official config is not needed)."""
    w_in = state["encoder.conv_in.weight"]
    ch, in_channels, dims = w_in.shape[0], w_in.shape[1], w_in.dim() - 2
    levels = _indices(state, r"encoder\.down\.(\d+)\.")
    ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
    num_res_blocks = len(_indices(state, r"encoder\.down\.0\.block\.(\d+)\."))
    z_channels = state["encoder.conv_out.weight"].shape[0]
    num_codes, codebook_dim = state["quantize.embedding.weight"].shape
    fields = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                  conv_bias="encoder.conv_in.bias" in state, norm_groups=NORM_GROUPS)
    base = get_arch("conv").size(BASE_SIZE)
    net = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items() if getattr(base, k) != v}
    simvq = SimVQOptions(bias="quantize.embedding_proj.bias" in state,
                         codebook_dim=0 if codebook_dim == z_channels else codebook_dim)
    return TokenizerConfig(arch="conv", size=BASE_SIZE, net=net, dims=dims, in_channels=in_channels,
                           quantizer="simvq", num_codes=num_codes, simvq=simvq)


def dcr_to_pixel_shuffle(t: torch.Tensor, r: int, dims: int) -> torch.Tensor:
    """Reorder dim 0 (a conv's output channels: weight rows or bias) from depth-to-space DCR order, channel
    (phase, c) at phase * C + c, to nn.PixelShuffle's (c, phase) at c * r**dims + phase."""
    phases = r ** dims
    channels = t.shape[0] // phases
    return t.reshape(phases, channels, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def convert(state: Mapping[str, torch.Tensor], cfg: TokenizerConfig) -> dict[str, torch.Tensor]:
    """Official names and layouts -> the project's, for `build_tokenizer(cfg)` (same numbers, renamed, the upsampler
    rows permuted)."""
    size = get_arch(cfg.arch).size(cfg.size, cfg.net)
    last, nrb = len(size.ch_mult) - 1, size.num_res_blocks
    out = {}
    for key, value in state.items():
        new = key.replace("nin_shortcut", "shortcut").replace("mid_block.", "mid.")
        if m := re.match(r"encoder\.down\.(\d+)\.block\.(\d+)\.(.*)", new):
            new = f"encoder.levels.{m[1]}.{m[2]}.{m[3]}"
        elif m := re.match(r"encoder\.down\.(\d+)\.downsample\.(.*)", new):
            new = f"encoder.levels.{m[1]}.{nrb}.{m[2]}"
        elif m := re.match(r"decoder\.up\.(\d+)\.block\.(\d+)\.(.*)", new):
            new = f"decoder.levels.{last - int(m[1])}.{m[2]}.{m[3]}"
        elif m := re.match(r"decoder\.up\.(\d+)\.upsample\.conv1\.(.*)", new):
            new = f"decoder.levels.{last - int(m[1])}.{nrb}.conv.{m[2]}"
            value = dcr_to_pixel_shuffle(value, 2, cfg.dims)
        elif new == "quantize.embedding.weight":
            new = "quantizer.frozen_codebook"
        elif new.startswith("quantize.embedding_proj."):
            new = new.replace("quantize.embedding_proj.", "quantizer.proj.")
        out[new] = value
    return out
