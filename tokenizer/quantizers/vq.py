"""Vanilla VQ (van den Oord et al. 2017): a learnable codebook trained by the codebook loss — the paper's
collapsing baseline. Only the codes the nearest-neighbour search selects get a gradient."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import DEFAULT_CHUNK_ELEMS, Quantizer


class VQ(Quantizer):
    def __init__(self, dim: int, num_codes: int, beta: float = 0.25, rotation_trick: bool = False,
                 chunk_elems: int = DEFAULT_CHUNK_ELEMS):
        super().__init__(dim, num_codes, beta=beta, rotation=rotation_trick, chunk_elems=chunk_elems)
        # taming-transformers' init, uniform(-1/K, 1/K)
        self.embedding = nn.Parameter(torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes))

    @property
    def codebook(self) -> Tensor:
        return self.embedding.float()  # a no-op for the fp32 parameter; fp32 even if the module was cast
