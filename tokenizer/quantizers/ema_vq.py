"""VQ with an exponential-moving-average codebook (VQ-VAE-2 / EnCodec): codes are running means of the latents
assigned to them, with Laplace smoothing of the counts; only the commitment term is a loss."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .base import DEFAULT_CHUNK_ELEMS, Quantizer


class EMAVQ(Quantizer):
    # For pipelines.trainer.EMA (the exported model's weight average): cluster_size and embed_avg are averaged like
    # parameters and `embedding` is then recomputed from the averages, so the averaged model keeps the invariant
    # embedding = embed_avg / smoothed(cluster_size) and its codebook is averaged over the same steps as its encoder.
    ema_derived_buffers = ("embedding",)

    def __init__(self, dim: int, num_codes: int, beta: float = 0.25, decay: float = 0.99, eps: float = 1e-5,
                 chunk_elems: int = DEFAULT_CHUNK_ELEMS):
        super().__init__(dim, num_codes, beta=beta, chunk_elems=chunk_elems)
        self.decay, self.eps = decay, eps
        init = torch.randn(num_codes, dim) * dim ** -0.5  # same scale as SimVQ's C, for a like-for-like baseline
        self.register_buffer("embedding", init)
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("embed_avg", init.clone())

    @property
    def codebook(self) -> Tensor:
        return self.embedding.float()  # a no-op for the fp32 buffer; fp32 even if the module was cast

    def loss(self, z: Tensor, z_q: Tensor) -> Tensor:
        return self.beta * F.mse_loss(z, z_q.detach())  # the codebook moves by EMA, not by gradient

    @torch.no_grad()
    def update(self, flat: Tensor, idx: Tensor) -> None:
        if not self.training:
            return
        flat = flat.detach().float()
        counts = torch.bincount(idx, minlength=self.num_codes).float()  # (K,)
        sums = torch.zeros_like(self.embed_avg).index_add_(0, idx, flat)  # (K, D)
        if dist.is_available() and dist.is_initialized():
            # Every process must apply the same update, or the codebooks drift apart under DDP.
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self.refresh_derived_buffers()

    @torch.no_grad()
    def refresh_derived_buffers(self) -> None:
        """embedding = embed_avg / Laplace-smoothed cluster_size (the smoothing keeps unused codes finite)."""
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.embedding.copy_(self.embed_avg / smoothed[:, None])
