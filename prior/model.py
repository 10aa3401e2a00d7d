"""Autoregressive prior over tokenizer codes: an x-transformers decoder with a class prefix token.

Codes are plain integers in [0, K); this module never imports the tokenizer. The token vocabulary is

    [0, K)                      the K codes
    [K, K + num_classes)        one prefix token per class
    K + num_classes             the learned null class: the "no label" token that classifier-free
                                guidance contrasts against, and the start token of an unconditional prior

so every sequence is `prefix, c_0, c_1, ..., c_{L-1}` and position i predicts code c_i from the prefix
and the codes before it (LlamaGen's class-token prefix, arXiv 2406.06525). The output head only covers
the K code ids: a class or null id can never be sampled.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

with warnings.catch_warnings():
    # The pinned x-transformers 2.31 decorates a helper with torch.jit.script at import, which torch 2.14 deprecates:
    # a FutureWarning on every prior command that no user can act on (it turned a one-line error into three lines).
    # Only that message is filtered, only during this import.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from x_transformers import Decoder, TransformerWrapper
    from x_transformers.x_transformers import Attention, FeedForward, Residual, apply_rotary_pos_emb


@dataclass(frozen=True)
class PriorSize:
    dim: int  # model width
    depth: int  # number of decoder blocks
    heads: int  # attention heads; dim must divide by it


# Named sizes: the CLI's `choices=` come from these keys. Parameter counts are for K=16,384.
PRIOR_SIZES: dict[str, PriorSize] = {
    "tiny": PriorSize(dim=128, depth=4, heads=4),  # ~0.8M + 4.2M embeddings; trains on a laptop CPU
    "small": PriorSize(dim=384, depth=6, heads=6),  # ~11M + 12.6M embeddings
    "gpt-b": PriorSize(dim=768, depth=12, heads=12),  # ~85M + 25M embeddings = ~110M (LlamaGen-B)
    "gpt-l": PriorSize(dim=1024, depth=24, heads=16),  # ~300M + 34M embeddings (LlamaGen-L)
}


@dataclass
class PriorConfig:
    size: str = "tiny"  # key of PRIOR_SIZES
    num_codes: int = 1024  # K, the tokenizer's codebook size; codes are ints in [0, K)
    seq_len: int = 256  # L, codes per sample (e.g. 16x16 tokens for a 128px image at stride 8)
    num_classes: int = 0  # 0 = unconditional (one start token); else class-conditional via a prefix token
    label_dropout: float = 0.1  # prob. of replacing a label by the null class in training (enables CFG)
    dropout: float = 0.0  # attention and feed-forward dropout
    emb_dropout: float = 0.0  # dropout on the token embeddings
    ff_mult: int = 4  # feed-forward hidden width = ff_mult * dim
    flash_attn: bool = True  # use torch's scaled_dot_product_attention (flash / memory-efficient kernels)

    def __post_init__(self) -> None:
        if self.size not in PRIOR_SIZES:
            raise ValueError(f"unknown prior size {self.size!r}; choose one of {sorted(PRIOR_SIZES)}")
        if self.num_codes < 2:
            raise ValueError(f"num_codes must be >= 2 (got {self.num_codes}); set it to the tokenizer's K")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1 (got {self.seq_len})")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (got {self.num_classes}); use 0 for unconditional")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout is a probability in [0, 1] (got {self.label_dropout})")

    @property
    def null_id(self) -> int:
        """Token id of the null class; also the start token of an unconditional prior."""
        return self.num_codes + self.num_classes

    @property
    def vocab_size(self) -> int:
        """K codes + one token per class + the null token."""
        return self.num_codes + self.num_classes + 1


class PriorLoss(NamedTuple):
    loss: Tensor  # scalar cross-entropy over all code positions
    accuracy: Tensor  # scalar fraction of positions whose argmax is the true code


@dataclass
class KVCache:
    """Keys and values of every attention layer, preallocated to seq_len and filled in place.

    x-transformers' own cache concatenates a new key onto the old ones every step and re-applies rotary
    positions to all of them, which is O(L) extra work per step; here each key is rotated once, when written.
    """

    keys: list[Tensor] = field(default_factory=list)  # per attention layer (B, heads, seq_len, dim_head), rotated
    values: list[Tensor] = field(default_factory=list)  # per attention layer (B, heads, seq_len, dim_head)
    length: int = 0  # positions filled so far


class PriorStep(NamedTuple):
    logits: Tensor  # (B, n, K) fp32 logits over code ids for the n input positions (the head runs in fp32)
    cache: KVCache | None  # key/value cache covering every token seen so far (None when decoding without one)


class Prior(nn.Module):
    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        size = PRIOR_SIZES[cfg.size]
        if size.dim % size.heads != 0:
            raise ValueError(f"size {cfg.size!r}: dim {size.dim} does not divide by heads {size.heads}")
        self.net = TransformerWrapper(
            num_tokens=cfg.vocab_size,
            logits_dim=cfg.num_codes,  # the head never scores class/null ids
            max_seq_len=cfg.seq_len,
            use_abs_pos_emb=False,  # rotary only: positions live in attention, and caching needs no offset
            emb_dropout=cfg.emb_dropout,
            attn_layers=Decoder(
                dim=size.dim,
                depth=size.depth,
                heads=size.heads,
                attn_dim_head=size.dim // size.heads,
                rotary_pos_emb=True,
                rotary_emb_dim=size.dim // size.heads,  # rotate every head dim, as LLaMA / LlamaGen do
                attn_flash=cfg.flash_attn,
                attn_dropout=cfg.dropout,
                ff_dropout=cfg.dropout,
                ff_mult=cfg.ff_mult,
            ),
        )
        self._check_cached_layout()

    @property
    def num_codes(self) -> int:
        return self.cfg.num_codes

    @property
    def conditional(self) -> bool:
        return self.cfg.num_classes > 0

    def prefix(self, labels: Tensor | None, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Prefix token ids (B, 1) for `labels` (B,) in [0, num_classes), or the null token when labels is None.

        In training mode each label is replaced by the null class with prob. cfg.label_dropout, so the
        same network also learns the unconditional distribution that CFG needs (Ho & Salimans 2022).
        """
        device = self.net.token_emb.emb.weight.device
        null = torch.full((batch_size,), self.cfg.null_id, dtype=torch.long, device=device)
        if labels is None:
            return null[:, None]
        if not self.conditional:
            raise ValueError("this prior is unconditional (num_classes=0): pass labels=None")
        labels = labels.to(device=device, dtype=torch.long)
        if labels.shape != (batch_size,):
            raise ValueError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}")
        if labels.min() < 0 or labels.max() >= self.cfg.num_classes:
            raise ValueError(
                f"labels must lie in [0, {self.cfg.num_classes}) (got {labels.min().item()}..{labels.max().item()}); "
                "unlabelled data needs num_classes=0 or a label per sample"
            )
        ids = labels + self.cfg.num_codes
        if self.training and self.cfg.label_dropout > 0:
            drop = torch.rand(batch_size, device=device, generator=generator) < self.cfg.label_dropout
            ids = torch.where(drop, null, ids)
        return ids[:, None]  # (B, 1)

    def step(self, tokens: Tensor, cache: KVCache | None = None) -> PriorStep:
        """Run the decoder on vocabulary ids (prefix included) and return fp32 code logits (the decode path).

        Without a cache, tokens (B, n) is the whole sequence so far and x-transformers' own forward runs it.
        With a cache (start from `KVCache()`), tokens (B, m) holds only the m ids that follow the cached ones;
        the cache is filled in place and returned. Both paths use the same weights and must agree. The trunk runs
        in whatever autocast the caller set; the output head does not (see `head_fp32`).
        """
        if cache is None:
            return PriorStep(self.head_fp32(self.net(tokens, return_embeddings=True)), None)
        return PriorStep(self._cached_forward(tokens, cache), cache)

    def head_fp32(self, hidden: Tensor) -> Tensor:
        """Final-normed hidden states (B, n, dim) -> code logits (B, n, K) in fp32, autocast off.

        Sampling divides logits by a temperature and amplifies cond - uncond by the CFG scale; bf16 logits (8 mantissa
        bits: steps of 0.06 at a logit of 10) would carry that rounding into the sampled distribution.
        """
        head = self.net.to_logits
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            return F.linear(hidden.float(), head.weight.float(), bias)

    def _cached_forward(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """The decoder's forward for `tokens` at positions [cache.length, cache.length + m), reading and
        writing the cache."""
        m = tokens.shape[1]  # new positions
        start, end = cache.length, cache.length + m
        if end > self.cfg.seq_len:
            raise ValueError(f"sequence would grow to {end} > seq_len {self.cfg.seq_len}")
        # New position start + i sees keys 0 .. start + i; a single new token sees everything.
        causal = None
        if m > 1:
            causal = torch.arange(end, device=tokens.device)[None, :] <= torch.arange(start, end, device=tokens.device)[:, None]

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            keys, values = self._layer_cache(cache, layer, k, v)
            keys[:, :, start:end], values[:, :, start:end] = k, v
            keys, values = keys[:, :, :end], values[:, :, :end]
            return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=causal)

        logits = self._walk(tokens, torch.arange(start, end, device=tokens.device), attend)
        cache.length = end
        return logits

    def static_step(self, tokens: Tensor, position: Tensor, cache: KVCache) -> Tensor:
        """One new id per row, tokens (R, 1), at the position held in `position` ((1,) int64, on the model's device)
        -> fp32 code logits (R, K). The keys and values are written into `cache` at that position and attention
        covers all seq_len cached positions, those after `position` masked out. Every shape is fixed and nothing is
        read back to the host, so the step is a function of static buffers that a CUDA graph can capture and replay
        (prior.sampling.DecodeStep); run eagerly it computes what `step` does with a growing cache (the masked
        positions weigh exactly 0; the cache starts zeroed, so they are never NaN). `cache.length` is not used."""
        visible = (torch.arange(self.cfg.seq_len, device=tokens.device) <= position)[None, None, None, :]

        def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            keys, values = self._layer_cache(cache, layer, k, v)
            keys.index_copy_(2, position, k)
            values.index_copy_(2, position, v)
            return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=visible)

        return self._walk(tokens, position, attend)[:, -1]

    def _layer_cache(self, cache: KVCache, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Attention layer `layer`'s (keys, values), each (B, heads, seq_len, dim_head) in k's dtype, allocated
        (zeroed) for the whole sequence on first use."""
        if len(cache.keys) == layer:
            shape = (k.shape[0], k.shape[1], self.cfg.seq_len, k.shape[-1])
            cache.keys.append(k.new_zeros(shape))
            cache.values.append(v.new_zeros(shape))
        return cache.keys[layer], cache.values[layer]

    def _walk(self, tokens: Tensor, positions: Tensor, attend) -> Tensor:
        """The decoder's forward for ids `tokens` (B, m) at `positions` (m,), with `attend(layer, q, k, v)` doing
        the cache's part of each attention layer ((B, heads, m, dim_head) each, keys rotated; returns the attention
        output in that shape) -> fp32 logits (B, m, K). It re-walks x-transformers' modules for the one layout
        `__init__` builds (pre-norm, rotary self-attention, feed-forward); `_check_cached_layout` refuses any other."""
        layers = self.net.attn_layers
        heads = PRIOR_SIZES[self.cfg.size].heads
        rotary, _ = layers.rotary_pos_emb(positions)  # (1, m, dim_head)
        x = self.net.token_emb(tokens)  # (B, m, dim); no absolute positions: rotary only
        attn_index = 0
        for (norms, block, residual), kind in zip(layers.layers, layers.layer_types):
            h = norms[0](x)  # pre-norm
            if kind == "f":
                x = residual(block(h), x)
                continue
            q, k, v = (proj(h).unflatten(-1, (heads, -1)).transpose(1, 2) for proj in (block.to_q, block.to_k, block.to_v))
            q, k = apply_rotary_pos_emb(q, rotary), apply_rotary_pos_emb(k, rotary)  # (B, heads, m, dim_head)
            out = attend(attn_index, q, k, v).transpose(1, 2).flatten(2)  # (B, heads, m, dim_head) -> (B, m, dim)
            x = residual(block.to_out(out), x)
            attn_index += 1
        return self.head_fp32(layers.final_norm(x))  # (B, m, K)

    def _check_cached_layout(self) -> None:
        layers = self.net.attn_layers
        for (norms, block, residual), kind in zip(layers.layers, layers.layer_types):
            expected = {"a": Attention, "f": FeedForward}.get(kind)
            plain = norms[1] is None and norms[2] is None and type(residual) is Residual
            if expected is None or not isinstance(block, expected) or not plain:
                raise NotImplementedError(
                    f"the kv-cache decoder only knows pre-norm rotary attention + feed-forward layers, got {kind!r}: "
                    "update Prior._cached_forward for the new Decoder options"
                )
        if layers.rotary_pos_emb is None:
            raise NotImplementedError("the kv-cache decoder needs rotary positions (rotary_pos_emb=True)")
        if not isinstance(self.net.to_logits, nn.Linear):
            raise NotImplementedError(f"head_fp32 needs the output head to be one nn.Linear, got "
                                      f"{type(self.net.to_logits).__name__}: update Prior.head_fp32")

    def forward(self, codes: Tensor, labels: Tensor | None = None) -> Tensor:
        """Teacher forcing: codes (B, L) int in [0, K), labels (B,) or None -> logits (B, L, K).

        logits[:, i] is the prediction for codes[:, i] given the prefix and codes[:, :i]. This is the training path:
        the head runs in the caller's autocast (bf16 on GPU, for speed; `next_code_loss` takes the cross-entropy
        in fp32), unlike `step`, whose logits are sampled from.
        """
        B, L = codes.shape  # batch, code positions
        if L > self.cfg.seq_len:
            raise ValueError(f"got {L} codes per sample but the prior was built with seq_len={self.cfg.seq_len}")
        if codes.min() < 0 or codes.max() >= self.cfg.num_codes:
            raise ValueError(
                f"codes must lie in [0, {self.cfg.num_codes}) (got {codes.min().item()}..{codes.max().item()}); "
                "is PriorConfig.num_codes the tokenizer's K?"
            )
        # The last code is never an input: nothing is predicted after it.
        tokens = torch.cat([self.prefix(labels, B), codes[:, :-1].to(torch.long)], dim=1)  # (B, L)
        return self.net(tokens)  # (B, L, K)


def next_code_loss(logits: Tensor, codes: Tensor) -> PriorLoss:
    """The prior's objective, for training and evaluation alike: cross-entropy in fp32 of the teacher-forced logits
    (B, L, K) = `prior(codes, labels)` against the codes (B, L), and top-1 accuracy per position. It takes logits, not
    the model, so that training scores the forward of the DDP-wrapped model (whose backward syncs gradients)."""
    targets = codes.to(torch.long)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())  # (B*L, K) vs (B*L,)
    accuracy = (logits.argmax(dim=-1) == targets).float().mean()
    return PriorLoss(loss, accuracy)


def build_prior(cfg: PriorConfig) -> Prior:
    return Prior(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
