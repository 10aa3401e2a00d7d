"""SimVQ (Li et al., arXiv 2411.02038): a frozen random codebook C re-parameterised by one learnable linear layer.

Q = W(C) = C W^T + b. The nearest-neighbour search picks rows of Q, but a gradient step on W moves *every* code at
once, so utilisation does not collapse as K grows (vanilla VQ only moves the codes it selects).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DEFAULT_CHUNK_ELEMS, EvalCache, Quantizer, flatten_latents


class SimVQ(Quantizer):
    # For pipelines.trainer.EMA: C never changes after construction, so the weight average neither averages nor
    # copies it (a K x D copy every step: 134 MB at K = 262,144).
    ema_constant_buffers = ("frozen_codebook",)

    def __init__(self, dim: int, num_codes: int, beta: float = 0.25, bias: bool = True,
                 rotation_trick: bool = False, codebook_dim: int | None = None, data_init: int = 0,
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
        self.data_init = data_init
        if data_init:
            # Not in the paper (EnCodec's k-means init plays this role for VQ): on each of the first `data_init`
            # training batches, W and b are rescaled so W(C) has the latents' per-dimension mean and spread. Without
            # it, an encoder whose initial output is one large offset plus tiny variation (SEANet's: per-dim std
            # 0.0016 across tokens around offsets of 0.035) sends every latent to one code (measured: 1 of 4,096
            # used from step 40 on, at commitment weight 1, 10 or 1000). Counted in a saved buffer, so a resumed run
            # goes on where it stopped.
            self.register_buffer("data_init_done", torch.zeros((), dtype=torch.long))

    def forward(self, z: Tensor):
        if self.training and self.data_init and int(self.data_init_done) < self.data_init:
            self.init_from_latents(flatten_latents(z))
        return super().forward(z)

    @torch.no_grad()
    def init_from_latents(self, flat: Tensor) -> None:
        """W <- diag(std(z) / std(C W^T)) W and b <- mean(z) - mean(C W'^T), from the latents of every process."""
        x = flat.detach().float()
        stats = torch.stack([x.sum(0), (x * x).sum(0), x.new_full((x.shape[1],), float(x.shape[0]))])  # (3, D)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        mean = stats[0] / stats[2]
        std = (stats[1] / stats[2] - mean * mean).clamp_min(1e-12).sqrt()
        cw = F.linear(self.frozen_codebook.float(), self.proj.weight.float())  # (K, D) without the bias
        scale = std / cw.std(0).clamp_min(1e-12)
        self.proj.weight.mul_(scale[:, None].to(self.proj.weight.dtype))
        if self.proj.bias is not None:
            self.proj.bias.copy_(mean - cw.mean(0) * scale)
        self.data_init_done += 1

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
