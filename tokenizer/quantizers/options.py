"""Each quantizer's options as a typed config section, so `--help` lists them and a typo is an error.

`TokenizerConfig` holds one section per registered quantizer (`--model.simvq.bias=false`, `--model.ema_vq.decay=0.9`,
`--model.fsq.levels=8,5,5,5`); only the section of the chosen `quantizer` is used. Defaults are the paper's (SimVQ)
and the libraries' own (FSQ/LFQ), so an empty section builds exactly what `build_quantizer(name, dim, K)` builds.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class SimVQOptions:
    beta: float = 0.25  # weight of ||sg(z_q) - z||^2, the term that trains the encoder (spec §2)
    bias: bool = True  # W(C) = C W^T + b; the paper keeps the bias (lucidrains' port drops it)
    rotation_trick: bool = False  # Fifty et al. 2024 gradient instead of straight-through
    codebook_dim: int = 0  # dimension of the frozen C before W maps it to D; 0 = D
    data_init: int = 0  # not in the paper: fit W(C)'s per-dim mean/std to the latents of the first N training batches


@dataclass
class VQOptions:
    beta: float = 0.25  # commitment weight (taming's legacy=False loss)
    rotation_trick: bool = False  # Fifty et al. 2024 gradient instead of straight-through


@dataclass
class EMAVQOptions:
    beta: float = 0.25  # commitment weight; the codebook itself moves by EMA, not by gradient
    decay: float = 0.99  # EMA decay of code counts and sums
    eps: float = 1e-5  # Laplace smoothing of the counts


@dataclass
class FSQOptions:
    levels: tuple[int, ...] = ()  # quantization levels per channel, prod = K; () = the FSQ paper's row for K
    preserve_symmetry: bool = False  # vector-quantize-pytorch's symmetric grid option


@dataclass
class LFQOptions:
    entropy_loss_weight: float = 0.1  # weight of the entropy term that spreads codes over K (library default)
    commitment_loss_weight: float = 0.0  # commitment weight (library default 0)
    diversity_gamma: float = 1.0  # weight of the batch-entropy (diversity) part of the entropy term


# quantizer registry name -> (TokenizerConfig field holding its options, options class)
OPTIONS: dict[str, tuple[str, type]] = {
    "simvq": ("simvq", SimVQOptions), "vq": ("vq", VQOptions), "ema-vq": ("ema_vq", EMAVQOptions),
    "fsq": ("fsq", FSQOptions), "lfq": ("lfq", LFQOptions),
}


def quantizer_kwargs(name: str, options: Any) -> dict[str, Any]:
    """The options section as keyword arguments of the quantizer class; "unset" values become the class default."""
    kwargs = dataclasses.asdict(options)
    if name == "simvq" and not kwargs["codebook_dim"]:
        kwargs["codebook_dim"] = None
    if name == "fsq":
        kwargs["levels"] = list(kwargs["levels"]) or None
    return kwargs
