"""What every quantizer shares: the named output, the bounded-memory nearest-code search, the VQ loss.

Contract (docs/CONTRACTS.md): `forward(z)` with z of shape (B, D, *grid) — (B, D, H, W) for images, (B, D, T) for
audio — returns `Quantized(z_q, codes, loss)`; `decode_codes(codes)` gives back z_q from integer codes; `codebook` is
the effective (K, D) codebook.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Distance tiles hold at most this many fp32 elements (128 MiB): memory stays bounded whatever N x K is
# (K=262,144 at N=16,384 would be a 17 GB matrix in one piece).
DEFAULT_CHUNK_ELEMS = 1 << 25
MIN_ROW_TILE = 16


class Quantized(NamedTuple):
    z_q: Tensor    # (B, D, *grid) quantized latents, straight-through: gradients reach the encoder
    codes: Tensor  # (B, *grid) int64 code indices
    loss: Tensor   # scalar, the quantizer's own training loss (commitment + codebook terms)


def flatten_latents(z: Tensor) -> Tensor:
    """(B, D, *grid) -> (N, D) with N = B * prod(grid), grid in raster (row-major) order."""
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def unflatten_latents(flat: Tensor, like: Tensor) -> Tensor:
    """(N, D) -> (B, D, *grid) of `like`'s shape."""
    b, d, *grid = like.shape
    return flat.reshape(b, *grid, d).movedim(-1, 1)


def _tile_starts(total: int, tile: int) -> list[int]:
    """Starts of equal tiles covering [0, total); the last is moved back to end at `total` (overlap is harmless)."""
    return [min(s, total - tile) for s in range(0, total, tile)]


@torch.no_grad()
def nearest_codes(z: Tensor, codebook: Tensor, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tensor:
    """argmin_k ||z_n - c_k||^2 for z (N, D), codebook (K, D) -> (N,) int64, in fp32, in bounded memory.

    Tiles over N and K hold at most `chunk_elems` distances. ||z||^2 is dropped: it is constant per row, so the argmin
    is unchanged and the fp32 differences between candidates stay exact to more digits. Ties go to the lowest index,
    as one full-matrix argmin would do: torch.argmin picks the first minimum inside a tile, and a later K-tile replaces
    the running best only when strictly smaller. Every tile has the same shape (the last one is shifted back to overlap
    its neighbour) because BLAS may round a dot product differently in a narrower GEMM, which would let a duplicate
    code in a short last tile win a tie. (Exact ties between duplicate codes then resolve as in one GEMM on the BLAS
    libraries we test; bit-identical rounding across GEMM shapes is not something BLAS promises.)
    """
    with torch.autocast(device_type=z.device.type, enabled=False):  # bf16 distances pick wrong codes
        z, cb = z.float(), codebook.detach().float()
        n, k = z.shape[0], cb.shape[0]
        cb_sq = cb.pow(2).sum(1)  # (K,)
        if z.is_cuda:
            # cuBLAS adds the (K,) bias in the GEMM epilogue: addmm beats even the bare product (H200, N=4,096,
            # K=65,536: 1.69 ms vs 1.90 ms; docs/BENCHMARKS.md).
            def distances(zc: Tensor, k0: int, kt: int) -> Tensor:
                return torch.addmm(cb_sq[k0:k0 + kt], zc, cb[k0:k0 + kt].T, alpha=-2.0)
            z_in = z
        else:
            # On CPU addmm first copies the bias into the whole (n, K) tile, a second pass over the largest tensor of
            # the forward; one plain GEMM [z, 1] @ [-2c, ||c||^2]^T does it in the product instead.
            cb_aug = torch.cat([cb * -2.0, cb_sq[:, None]], 1)  # (K, D+1)

            def distances(zc: Tensor, k0: int, kt: int) -> Tensor:
                return zc @ cb_aug[k0:k0 + kt].T
            z_in = torch.cat([z, z.new_ones(n, 1)], 1)  # (N, D+1)
        k_tile = min(k, chunk_elems)
        # >= 16 rows: a one-row GEMM takes BLAS's GEMV path, whose rounding depends on a column's position.
        n_tile = min(n, max(MIN_ROW_TILE, chunk_elems // k_tile))
        out = torch.empty(n, dtype=torch.long, device=z.device)
        for n0 in _tile_starts(n, n_tile):
            zc = z_in[n0:n0 + n_tile]  # (n_tile, D) or (n_tile, D+1)
            best_d = best_i = None
            for k0 in _tile_starts(k, k_tile):
                d = distances(zc, k0, k_tile)  # (n_tile, k_tile) = ||c||^2 - 2 z.c
                i = d.argmin(1)  # (n,)
                if best_i is None:
                    if k_tile == k:  # one K-tile: the common case, no running minimum needed
                        best_i = i
                        break
                    best_d, best_i = d.gather(1, i[:, None])[:, 0], i
                else:
                    dmin = d.gather(1, i[:, None])[:, 0]
                    better = dmin < best_d
                    best_d = torch.where(better, dmin, best_d)
                    best_i = torch.where(better, i + k0, best_i)
            out[n0:n0 + n_tile] = best_i
        return out


def vq_loss(z: Tensor, z_q: Tensor, beta: float) -> Tensor:
    """beta * ||sg(z_q) - z||^2 (trains the encoder) + ||z_q - sg(z)||^2 (trains the codebook), taming's legacy=False."""
    return beta * F.mse_loss(z, z_q.detach()) + F.mse_loss(z_q, z.detach())


def straight_through(z: Tensor, z_q: Tensor) -> Tensor:
    """Forward value z_q, gradient passed to z unchanged."""
    return z + (z_q - z).detach()


def rotation_trick(z: Tensor, z_q: Tensor, eps: float = 1e-6) -> Tensor:
    """Fifty et al. 2024 ("Restructuring vector quantization with the rotation trick"), rows of (N, D).

    Forward value z_q; the gradient reaches z through the fixed rotation + rescaling that maps z onto z_q, instead of
    the identity of the straight-through estimator. R z = z - 2 (z.w) w + 2 (z.u) q with u = z/|z|, q = z_q/|z_q|,
    w = (u + q)/|u + q|, all treated as constants; the scale |z_q|/|z| too.
    """
    z_norm = z.norm(dim=-1, keepdim=True).clamp_min(eps)
    q_norm = z_q.norm(dim=-1, keepdim=True).clamp_min(eps)
    u = (z / z_norm).detach()
    q = (z_q / q_norm).detach()
    w = F.normalize(u + q, dim=-1, eps=eps).detach()
    rotated = z - 2 * (z * w).sum(-1, keepdim=True) * w + 2 * (z * u).sum(-1, keepdim=True) * q
    return rotated * (q_norm / z_norm).detach()


class EvalCache:
    """A value derived from a module's weights (an effective codebook), recomputed on every training call (it must
    carry gradients) and cached in eval while the weights are unchanged: an in-place update bumps a tensor's
    `_version`, a load or `.to()` replaces its storage or dtype. One cache for every quantizer that derives its
    codebook (SimVQ's W(C), the FSQ/LFQ adapters' implicit codes)."""

    def __init__(self):
        self.entry: tuple | None = None  # (weights key, value)

    def __call__(self, module: nn.Module, compute) -> Tensor:
        if module.training or torch.is_grad_enabled():
            self.entry = None
            return compute()
        # Not via nn.Module attributes named `_version`: that name is the state_dict version number.
        tensors = [*module.parameters(), *module.buffers()]
        key = tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)
        if self.entry is None or self.entry[0] != key:
            self.entry = (key, compute())
        return self.entry[1]


class Quantizer(nn.Module):
    """Base for nearest-neighbour quantizers: subclasses provide `codebook` (K, D) and may override `update`."""

    def __init__(self, dim: int, num_codes: int, beta: float = 0.25, rotation: bool = False,
                 chunk_elems: int = DEFAULT_CHUNK_ELEMS):
        super().__init__()
        self.dim, self.num_codes, self.beta = dim, num_codes, beta
        self.rotation = rotation
        self.chunk_elems = chunk_elems

    @property
    def codebook(self) -> Tensor:
        """The effective (K, D) codebook in fp32, whatever autocast is active around the call."""
        raise NotImplementedError

    def decode_codes(self, codes: Tensor) -> Tensor:
        """(B, *grid) int codes -> (B, D, *grid) latents: the same values forward() returns as z_q."""
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(f"codes must lie in [0, {self.num_codes}); got [{int(codes.min())}, {int(codes.max())}]")
        return F.embedding(codes.long(), self.codebook).movedim(-1, 1)  # (B, *grid, D) -> (B, D, *grid)

    def loss(self, z: Tensor, z_q: Tensor) -> Tensor:
        return vq_loss(z, z_q, self.beta)

    def forward(self, z: Tensor) -> Quantized:
        """Codes depend on z's values only, not on the caller's precision: `codebook` is fp32 (subclasses compute it
        with autocast off) and the search runs in fp32. The loss and the straight-through (or rotation) output are
        computed in fp32 from the fp32 codebook rows; z_q comes back in z's dtype, so a bf16 graph stays bf16."""
        if z.shape[1] != self.dim:
            raise ValueError(f"expected latents (B, {self.dim}, *grid), got {tuple(z.shape)}")
        flat = flatten_latents(z)  # (N, D)
        codebook = self.codebook  # (K, D) fp32, differentiable where the codebook is learned
        idx = nearest_codes(flat, codebook, self.chunk_elems)  # (N,)
        q = F.embedding(idx, codebook)  # (N, D) fp32; gradient flows back into the codebook rows used
        self.update(flat, idx)
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf = flat.float()  # the cast is differentiable: the encoder still gets its gradient in its own dtype
            loss = self.loss(zf, q)
            out = rotation_trick(zf, q) if self.rotation else straight_through(zf, q)
        codes = idx.reshape(z.shape[0], *z.shape[2:])  # (B, *grid)
        return Quantized(unflatten_latents(out.to(z.dtype), z), codes, loss)

    def update(self, flat: Tensor, idx: Tensor) -> None:
        """Hook for non-gradient codebook updates (EMA); nothing by default."""
