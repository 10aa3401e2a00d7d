"""FSQ and LFQ from vector-quantize-pytorch, wrapped in the project's quantizer contract, as baselines for SimVQ.

FSQ (Mentzer et al., arXiv 2309.15505) rounds each of len(levels) bounded channels to a fixed grid: K = prod(levels),
no codebook to learn, no loss. LFQ (Yu et al., arXiv 2310.05737, MAGVIT-v2) takes the sign of log2(K) channels and
is trained by an entropy loss that spreads the batch over all K codes. Both project D -> codebook dims -> D with
learned linear layers when D differs, so the effective codebook is project_out(implicit codes), not a nearest
neighbour of z in D: the codes come from the library's own rounding, never from `nearest_codes`.

vector-quantize-pytorch is optional (the `bench` extra): it is imported when an adapter is built, not when this module
is, so registering the adapters costs nothing to an install without it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import EvalCache, Quantized, Quantizer

# The FSQ paper's recommended levels (Table 1, arXiv 2309.15505) for target sizes 2^8 .. 2^16. Keyed by the exact
# number of codes prod(levels): only some rows are powers of two, and a quantizer's K must be what its codes span,
# so num_codes=1024 is refused with a pointer to 1000 rather than silently becoming 1000.
FSQ_LEVELS: dict[int, list[int]] = {
    240: [8, 6, 5],                # ~2^8
    1000: [8, 5, 5, 5],            # ~2^10
    4375: [7, 5, 5, 5, 5],         # ~2^12
    15360: [8, 8, 8, 6, 5],        # ~2^14
    64000: [8, 8, 8, 5, 5, 5],     # ~2^16
}

# Options the adapter fixes itself: it feeds the library (B, N, D) and expects one index per position.
_RESERVED = ("dim", "codebook_size", "channel_first", "num_codebooks", "keep_num_codebooks_dim", "return_indices")


def _import_vqp():
    try:
        import vector_quantize_pytorch
    except ImportError as e:
        raise ImportError("the fsq and lfq quantizers wrap vector-quantize-pytorch, an optional dependency: "
                          "pip install 'simvq-pipeline[bench]' (or pip install vector-quantize-pytorch)") from e
    return vector_quantize_pytorch


def fsq_levels(num_codes: int) -> list[int]:
    """The FSQ paper's levels for K = prod(levels) in FSQ_LEVELS; a clear error for any other K."""
    if num_codes in FSQ_LEVELS:
        return list(FSQ_LEVELS[num_codes])
    near = {2 ** round(math.log2(k)): k for k in FSQ_LEVELS}
    hint = ""
    if num_codes in near:
        k = near[num_codes]
        hint = f" (the paper's row for 2^{round(math.log2(k))} is levels {FSQ_LEVELS[k]}, K = {k}: use num_codes={k})"
    raise ValueError(f"fsq has no standard levels for num_codes={num_codes}{hint}; supported K = prod(levels): "
                     f"{sorted(FSQ_LEVELS)}, or pass levels=[...] with num_codes equal to their product")


class LibraryQuantizer(Quantizer):
    """A vector-quantize-pytorch module (`self.inner`) on the contract; subclasses build it and say how to run it.

    forward and decode_codes are the library's own (not the nearest-neighbour search of `Quantizer`); `codebook` is
    indices_to_codes(arange(K)), O(K * D), recomputed while training, cached in eval until the projection changes.
    The library runs in fp32 with autocast off: its own `force_quantization_f32` turns off only CUDA autocast and
    only around the rounding, so its projections would otherwise run in the caller's bf16 and pick other codes.
    """

    inner: nn.Module

    def __init__(self, dim: int, num_codes: int, kwargs: dict):
        super().__init__(dim, num_codes)
        bad = sorted(set(kwargs) & set(_RESERVED))
        if bad:
            raise ValueError(f"{type(self).__name__} sets {bad} itself; drop them from the quantizer kwargs")
        self._cache = EvalCache()

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, D) -> (quantized (B, N, D), indices (B, N), loss scalar)."""
        raise NotImplementedError

    def forward(self, z: Tensor) -> Quantized:
        if z.shape[1] != self.dim:
            raise ValueError(f"expected latents (B, {self.dim}, *grid), got {tuple(z.shape)}")
        b, d, *grid = z.shape
        x = z.reshape(b, d, -1).transpose(1, 2)  # (B, N, D), N = prod(grid) in raster order
        with torch.autocast(device_type=z.device.type, enabled=False):
            q, idx, loss = self._run(x.float())  # fp32 codes and loss, whatever the caller's precision
        z_q = q.transpose(1, 2).reshape(z.shape).to(z.dtype)  # (B, D, *grid), in z's dtype like the other quantizers
        return Quantized(z_q, idx.long().reshape(b, *grid), loss)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """(B, *grid) int codes -> (B, D, *grid): the library's indices_to_codes, the values forward() gave."""
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(f"codes must lie in [0, {self.num_codes}); got [{int(codes.min())}, {int(codes.max())}]")
        b, *grid = codes.shape
        with torch.autocast(device_type=codes.device.type, enabled=False):
            q = self.inner.indices_to_codes(codes.long().reshape(b, -1))  # (B, N, D) fp32
        return q.transpose(1, 2).reshape(b, self.dim, *grid)

    @property
    def codebook(self) -> Tensor:
        """(K, D) fp32 = indices_to_codes(arange(K)); recomputed while training, cached in eval while the weights
        hold (it is computed with autocast off, so the cache does not depend on the caller's autocast state)."""
        return self._cache(self, self._all_codes)

    def _all_codes(self) -> Tensor:
        device = next(iter([*self.parameters(), *self.buffers()])).device
        idx = torch.arange(self.num_codes, device=device)[None]  # (1, K)
        with torch.autocast(device_type=device.type, enabled=False):
            return self.inner.indices_to_codes(idx)[0].float()  # (K, D)


class FSQAdapter(LibraryQuantizer):
    """Finite scalar quantization: `levels` (default: the paper's row for num_codes), K = prod(levels), loss = 0.

    Extra kwargs go to vector_quantize_pytorch.FSQ (e.g. preserve_symmetry, projection_has_bias).
    """

    def __init__(self, dim: int, num_codes: int, levels: list[int] | None = None, **kwargs):
        super().__init__(dim, num_codes, kwargs)
        if levels is None:
            levels = fsq_levels(num_codes)
        elif math.prod(levels) != num_codes:
            raise ValueError(f"fsq levels {list(levels)} give K = {math.prod(levels)} codes, not num_codes={num_codes}")
        self.levels = list(levels)
        self.inner = _import_vqp().FSQ(levels=self.levels, dim=dim, channel_first=False, **kwargs)

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, idx = self.inner(x)  # idx (B, N) int32
        return q, idx, x.new_zeros(())  # nothing to learn in the quantizer itself: the grid is fixed


class LFQAdapter(LibraryQuantizer):
    """Lookup-free quantization: K a power of two, log2(K) sign bits; loss = the library's weighted aux loss
    (entropy_loss_weight * (per-sample entropy - diversity_gamma * batch entropy) + commitment), 0 in eval.

    Extra kwargs go to vector_quantize_pytorch.LFQ (e.g. entropy_loss_weight=0.1, commitment_loss_weight=0.25,
    diversity_gamma=1.0). The entropy term holds an (N, K) softmax, so memory grows with N * K as in the library.
    """

    def __init__(self, dim: int, num_codes: int, **kwargs):
        super().__init__(dim, num_codes, kwargs)
        if num_codes < 2 or num_codes & (num_codes - 1):
            raise ValueError(f"lfq needs num_codes a power of two (K = 2^bits), got {num_codes}; "
                             f"nearest: {2 ** math.floor(math.log2(max(num_codes, 2)))} or "
                             f"{2 ** math.ceil(math.log2(max(num_codes, 2)))}")
        self.inner = _import_vqp().LFQ(codebook_size=num_codes, dim=dim, channel_first=False, **kwargs)

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, idx, aux = self.inner(x)  # idx (B, N)
        return q, idx, aux
