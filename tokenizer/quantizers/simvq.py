"""SimVQ (Li et al., arXiv 2411.02038): a frozen random codebook C re-parameterised by one learnable linear layer.

Q = W(C) = C W^T + b. The nearest-neighbour search picks rows of Q, but a gradient step on W moves *every* code at
once, so utilisation does not collapse as K grows (vanilla VQ only moves the codes it selects).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import DEFAULT_CHUNK_ELEMS, Quantizer


class SimVQ(Quantizer):
    def __init__(self, dim: int, num_codes: int, beta: float = 0.25, bias: bool = True,
                 rotation_trick: bool = False, codebook_dim: int | None = None,
                 chunk_elems: int = DEFAULT_CHUNK_ELEMS):
        super().__init__(dim, num_codes, beta=beta, rotation=rotation_trick, chunk_elems=chunk_elems)
        cdim = codebook_dim or dim
        # C ~ N(0, 1/d): the small std matters (spec §2). A persistent buffer: saved with the model, never in the
        # optimiser, never re-drawn on load — the tokens mean nothing without this exact matrix.
        self.register_buffer("frozen_codebook", torch.randn(num_codes, cdim) * cdim ** -0.5, persistent=True)
        # PyTorch's default Linear init, bias on: the paper's setting. (lucidrains' port drops the bias; users
        # report collapse there.)
        self.proj = nn.Linear(cdim, dim, bias=bias)
        self._cache: tuple | None = None

    def _version(self) -> tuple:
        ps = [self.proj.weight, self.frozen_codebook] + ([self.proj.bias] if self.proj.bias is not None else [])
        return tuple((p._version, p.data_ptr(), p.dtype) for p in ps)

    @property
    def codebook(self) -> Tensor:
        """(K, D) = W(C). Recomputed every training step; cached in eval while W and C are unchanged."""
        if self.training or torch.is_grad_enabled():
            self._cache = None
            return self.proj(self.frozen_codebook)
        version = self._version()
        if self._cache is None or self._cache[0] != version:
            self._cache = (version, self.proj(self.frozen_codebook))
        return self._cache[1]
