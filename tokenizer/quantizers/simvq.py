"""SimVQ (Li et al., arXiv 2411.02038): a frozen random codebook C re-parameterised by one learnable linear layer.

Q = W(C) = C W^T + b. The nearest-neighbour search picks rows of Q, but a gradient step on W moves *every* code at
once, so utilisation does not collapse as K grows (vanilla VQ only moves the codes it selects).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DEFAULT_CHUNK_ELEMS, EvalCache, Quantizer


class SimVQ(Quantizer):
    # For pipelines.trainer.EMA: C never changes after construction, so the weight average neither averages nor
    # copies it (a K x D copy every step: 134 MB at K = 262,144).
    ema_constant_buffers = ("frozen_codebook",)

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
        self._cache = EvalCache()

    def _project(self) -> Tensor:
        # fp32 with autocast off: under bf16 autocast the Linear would round W(C) to bf16 before the fp32 search
        # (0.7% of codes differ from fp32 ones at K = 16,384 with random latents).
        with torch.autocast(device_type=self.frozen_codebook.device.type, enabled=False):
            bias = None if self.proj.bias is None else self.proj.bias.float()
            return F.linear(self.frozen_codebook.float(), self.proj.weight.float(), bias)

    @property
    def codebook(self) -> Tensor:
        """(K, D) = W(C) in fp32 whatever autocast is active. Recomputed every training step; cached in eval while W
        and C are unchanged (the value does not depend on autocast, so neither does the cache)."""
        return self._cache(self, self._project)
