"""Quantizers on one contract: forward(z (B, D, *grid)) -> Quantized(z_q, codes, loss); decode_codes(codes) -> z_q."""
from __future__ import annotations

from .adapters import FSQAdapter, LFQAdapter  # vector-quantize-pytorch is imported only when one is built
from .base import Quantized, Quantizer, nearest_codes
from .ema_vq import EMAVQ
from .simvq import SimVQ
from .usage import CodebookUsage
from .vq import VQ

QUANTIZERS: dict[str, type[Quantizer]] = {"simvq": SimVQ, "vq": VQ, "ema-vq": EMAVQ,
                                           "fsq": FSQAdapter, "lfq": LFQAdapter}


def build_quantizer(name: str, dim: int, num_codes: int, **kwargs) -> Quantizer:
    """A quantizer by registry name; kwargs are that class's options (e.g. simvq: beta, bias, rotation_trick)."""
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; choose one of {sorted(QUANTIZERS)}")
    return QUANTIZERS[name](dim=dim, num_codes=num_codes, **kwargs)


__all__ = ["QUANTIZERS", "build_quantizer", "Quantized", "Quantizer", "CodebookUsage", "nearest_codes",
           "SimVQ", "VQ", "EMAVQ"]
