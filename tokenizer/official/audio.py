"""The official audio tokenizer (`taming.models.vq_audio.VQModel`, configs/libritts_24khz.yaml) -> `seanet-vocos`.

The official generator is `encoder` (EnCodec's SEANetEncoder) -> `quantize` (SimVQ1D) -> `backbone` (VocosBackbone)
-> `head` (ISTFTHead). It also builds and saves a SEANet `decoder` that `decode()` never calls: dropped, with the
losses. What changes on the way:
- encoder names: the flat `encoder.model.{i}` Sequential (ELUs hold no weights, so their indices are gaps) becomes
  `conv_in`, `levels.{l}.res.{j}` (`block.1` -> `conv1`, `block.3` -> `conv2`, `shortcut`), `levels.{l}.down`,
  `lstm`, `conv_out`; each conv's `conv.conv.` wrapper level disappears.
- weight norm: the official convs hold `weight_g` (C_out, 1, 1) and `weight_v` (legacy torch.nn.utils.weight_norm,
  dim 0). They are folded into plain weights, w = g * v / ||v|| with the norm over all dims but 0, and the config
  says `net.weight_norm = false`; a config that asks for weight norm gets (g, v) as its parametrisation instead.
- `backbone.*` -> `decoder.backbone.*` and `head.out.*` -> `decoder.head.out.*`, same names; the head's Hann window
  `head.istft.window` (a buffer, never EMA-shadowed: hence `FROZEN`) is checked and dropped, the project derives it.
- `quantize.embedding` (frozen C) -> `quantizer.frozen_codebook`, `quantize.embedding_proj` (W) -> `quantizer.proj`.
Inferred from the shapes: widths, strides (kernel = 2 * stride), residual units per level, LSTM depth, D, the Vocos
widths and depth, n_fft, K. Not in any shape: causal-ness, taken as the official `causal: true`; the iSTFT hop, which
the arch ties to the encoder's hop (the official code hard-codes 320 for both); SimVQ's beta (0.25 in every config).
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from tokenizer.autoencoder import TokenizerConfig
from tokenizer.nets import get_arch
from tokenizer.quantizers.options import SimVQOptions

PREFIXES = ("encoder.", "backbone.", "head.", "quantize.")  # the generator decode() uses; `decoder.*` is never run
WINDOW = "head.istft.window"
FROZEN = ("quantize.embedding.weight", WINDOW)  # no LitEma shadow: the frozen codebook and the window buffer
ARCH = "seanet-vocos"
CAUSAL = True  # configs/libritts_24khz.yaml; padding leaves no trace in the weights


def detect(state: Mapping[str, torch.Tensor]) -> bool:
    return "backbone.embed.weight" in state and "head.out.weight" in state and any(
        k.startswith("encoder.model.") for k in state)


def encoder_layout(state: Mapping[str, torch.Tensor]) -> list[tuple[int, str]]:
    """The official encoder's Sequential as [(index, "conv" | "res" | "lstm")] for the indices holding weights."""
    kinds = {}
    for key in state:
        if m := re.match(r"encoder\.model\.(\d+)\.(lstm|block|shortcut|conv)\.", key):
            kinds[int(m[1])] = {"shortcut": "res", "block": "res"}.get(m[2], m[2])
    return sorted(kinds.items())


def project_encoder_names(state: Mapping[str, torch.Tensor]) -> dict[int, str]:
    """Official encoder index -> project module path: conv_in, levels.{l}.res.{j}, levels.{l}.down, lstm, conv_out."""
    layout = encoder_layout(state)
    convs = [i for i, kind in layout if kind == "conv"]
    names, level, unit = {}, 0, 0
    for i, kind in layout:
        if i == convs[0]:
            names[i] = "encoder.conv_in"
        elif i == convs[-1]:
            names[i] = "encoder.conv_out"
        elif kind == "res":
            names[i] = f"encoder.levels.{level}.res.{unit}"
            unit += 1
        elif kind == "conv":
            names[i] = f"encoder.levels.{level}.down"
            level, unit = level + 1, 0
        else:
            names[i] = "encoder.lstm"
    return names


def conv_weight(state: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """A conv's effective weight: `prefix.weight`, or folded from its weight norm (g, v)."""
    if prefix + "weight_v" not in state:
        return state[prefix + "weight"]
    g, v = state[prefix + "weight_g"], state[prefix + "weight_v"]
    return v * (g / v.flatten(1).norm(dim=1).view(-1, *[1] * (v.dim() - 1)))


def infer_config(state: Mapping[str, torch.Tensor]) -> TokenizerConfig:
    """Every width and depth from the tensor shapes (the official config is not needed); causal-ness is the official
    default (see the module docstring)."""
    layout = encoder_layout(state)
    convs = [i for i, kind in layout if kind == "conv"]
    first = conv_weight(state, f"encoder.model.{convs[0]}.conv.conv.")  # (n_filters, channels, 7)
    downs = [conv_weight(state, f"encoder.model.{i}.conv.conv.").shape[-1] // 2 for i in convs[1:-1]]
    res_before_first_down = sum(1 for i, kind in layout if kind == "res" and i < convs[1])
    lstm_layers = sum(1 for k in state if re.fullmatch(r"encoder\.model\.\d+\.lstm\.weight_ih_l\d+", k))
    codebook = state["quantize.embedding.weight"]  # (K, codebook dim)
    fields = dict(
        n_filters=first.shape[0], strides=tuple(downs),
        z_channels=conv_weight(state, f"encoder.model.{convs[-1]}.conv.conv.").shape[0],
        causal=CAUSAL, residual_layers=res_before_first_down, lstm_layers=lstm_layers, weight_norm=False,
        dim=state["backbone.embed.weight"].shape[0],
        intermediate_dim=state["backbone.convnext.0.pwconv1.weight"].shape[0],
        num_layers=len({k.split(".")[2] for k in state if k.startswith("backbone.convnext.")}),
        n_fft=state["head.out.weight"].shape[0] - 2)
    arch = get_arch(ARCH)
    # The named size the fewest fields differ from (the paper's on a tie); the differences become `net` overrides.
    size = min(arch.sizes, key=lambda name: (sum(getattr(arch.sizes[name], k) != v for k, v in fields.items()),
                                             name != "paper"))
    base = arch.sizes[size]
    net = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items() if getattr(base, k) != v}
    num_codes, codebook_dim = codebook.shape
    simvq = SimVQOptions(bias="quantize.embedding_proj.bias" in state,
                         codebook_dim=0 if codebook_dim == fields["z_channels"] else codebook_dim)
    return TokenizerConfig(arch=ARCH, size=size, net=net, dims=1, in_channels=first.shape[1], quantizer="simvq",
                           num_codes=num_codes, simvq=simvq)


def convert(state: Mapping[str, torch.Tensor], cfg: TokenizerConfig) -> dict[str, torch.Tensor]:
    """Official names and layouts -> the project's, for `build_tokenizer(cfg)`: renamed, weight norm folded unless
    the config keeps it, the window dropped after checking it is the Hann window the project builds."""
    size = get_arch(cfg.arch).size(cfg.size, cfg.net)
    names = project_encoder_names(state)
    out = {}
    for key, value in state.items():
        if m := re.fullmatch(r"encoder\.model\.(\d+)\.(.*)", key):
            name, rest = names[int(m[1])], m[2]
            rest = re.sub(r"^block\.1\.", "conv1.", re.sub(r"^block\.3\.", "conv2.", rest))
            rest = rest.replace("conv.conv.", "").replace("lstm.", "")
            if rest.endswith("weight_v"):
                continue  # taken with its weight_g
            if rest.endswith("weight_g"):
                prefix = key[:-len("weight_g")]
                stem = f"{name}.{rest[:-len('weight_g')]}"
                if size.weight_norm:
                    out[stem + "parametrizations.weight.original0"] = value
                    out[stem + "parametrizations.weight.original1"] = state[prefix + "weight_v"]
                else:
                    out[stem + "weight"] = conv_weight(state, prefix)
                continue
            out[f"{name}.{rest}"] = value
        elif key.startswith(("backbone.", "head.out.")):
            out["decoder." + key] = value
        elif key == WINDOW:
            expected = torch.hann_window(size.n_fft)
            if value.shape != expected.shape or not torch.allclose(value.float(), expected, atol=1e-6):
                from tokenizer.official import OfficialFormatError  # not at the top: that package imports this module
                raise OfficialFormatError(f"{WINDOW} is not the periodic Hann window of {size.n_fft} samples the "
                                          f"project's iSTFT head uses; this checkpoint is of another layout")
        elif key == "quantize.embedding.weight":
            out["quantizer.frozen_codebook"] = value
        elif key.startswith("quantize.embedding_proj."):
            out[key.replace("quantize.embedding_proj.", "quantizer.proj.")] = value
        else:
            out[key] = value  # unknown: kept under its name, so check_against reports it
    return out
