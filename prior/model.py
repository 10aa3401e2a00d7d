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

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from x_transformers import Decoder, TransformerWrapper
from x_transformers.x_transformers import LayerIntermediates


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


class PriorStep(NamedTuple):
    logits: Tensor  # (B, n, K) logits over code ids for the n input positions
    cache: LayerIntermediates | None  # key/value cache covering every token seen so far


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

    def step(self, tokens: Tensor, cache: LayerIntermediates | None = None) -> PriorStep:
        """Run the decoder on vocabulary ids (prefix included) and return code logits plus a kv cache.

        Without a cache, tokens (B, n) is the whole sequence so far. With a cache, tokens (B, m) holds only
        the m new ids that follow the cached ones (x-transformers' `input_not_include_cache`).
        """
        if cache is not None and cache.cache_length + tokens.shape[1] > self.cfg.seq_len:
            raise ValueError(
                f"sequence would grow to {cache.cache_length + tokens.shape[1]} > seq_len {self.cfg.seq_len}"
            )
        extra = {} if cache is None else {"cache_age": tokens.shape[1]}  # how many new ids follow the cache
        logits, cache = self.net(tokens, cache=cache, return_intermediates=True, input_not_include_cache=True, **extra)
        return PriorStep(logits, cache)

    def forward(self, codes: Tensor, labels: Tensor | None = None) -> Tensor:
        """Teacher forcing: codes (B, L) int in [0, K), labels (B,) or None -> logits (B, L, K).

        logits[:, i] is the prediction for codes[:, i] given the prefix and codes[:, :i].
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

    def loss(self, codes: Tensor, labels: Tensor | None = None) -> PriorLoss:
        logits = self(codes, labels)  # (B, L, K)
        targets = codes.to(torch.long)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())  # (B*L, K) vs (B*L,)
        accuracy = (logits.argmax(dim=-1) == targets).float().mean()
        return PriorLoss(loss, accuracy)


def build_prior(cfg: PriorConfig) -> Prior:
    return Prior(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
