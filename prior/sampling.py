"""Sampling codes from a Prior: filters, classifier-free guidance, a key/value cache, per-sample seeds.

Everything here is a pure function of (prior, labels, settings, seeds). A step of decoding is

    logits (B, K) --CFG--> guided --/temperature--> --top-k--> --top-p--> --min-p--> probs --> code

Randomness: each sample owns a torch.Generator seeded by its own seed, which draws that sample's L
uniforms up front; a code is drawn by inverting the CDF of its filtered distribution at that uniform.
So sample b's codes depend only on (seed_b, label_b), never on its batch-mates or on the batch size.

Precision: the caller may run the prior under bf16 autocast (pipelines/sample.py does on CUDA); the logits still
come out of an fp32 head (`Prior.step`), and guidance, filters and the draw run in fp32 with autocast off, since CFG
amplifies any rounding in cond - uncond by the guidance scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from prior.model import KVCache, Prior

CFG_SCHEDULES = ("constant", "linear", "interval")


@dataclass
class SampleSettings:
    temperature: float = 1.0  # softmax temperature; 0 = greedy argmax (filters and seeds then do nothing)
    top_k: int = 0  # keep only the k most likely codes; 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest set of codes holding >= top_p of the mass; 1 = off
    min_p: float = 0.0  # drop codes whose prob. is < min_p * the top code's prob.; 0 = off
    cfg_scale: float = 1.0  # classifier-free guidance; 1 = conditional only (no extra batch), 0 = unconditional
    cfg_schedule: str = "constant"  # constant | linear (ramp 1 -> cfg_scale over positions) | interval
    cfg_interval: tuple[float, float] = (0.0, 1.0)  # "interval": guide only positions i with start <= i/L < end
    use_cache: bool = True  # incremental decoding with a key/value cache; False recomputes the whole prefix

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature}); use 0 for greedy")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (got {self.top_k}); use 0 to turn it off")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p}); use 1 to turn it off")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (got {self.min_p}); use 0 to turn it off")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule {self.cfg_schedule!r} is not one of {CFG_SCHEDULES}")
        start, end = self.cfg_interval
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"cfg_interval must satisfy 0 <= start <= end <= 1 (got {self.cfg_interval})")


class Sampled(NamedTuple):
    codes: Tensor  # (B, L) int64 codes in [0, K)
    logits: Tensor | None  # (B, L, K) guided fp32 logits before temperature and filters, if kept


# ---------------------------------------------------------------------------------------------------
# Filters: logits (B, K) -> logits (B, K) with the excluded codes set to -inf.


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]  # (B, 1) the k-th largest logit
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, K) each
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely codes
    # A code is kept while the codes above it hold < p; the top code is always kept.
    remove_sorted = mass_before >= p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)  # back to code order
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits.masked_fill(probs < threshold, float("-inf"))


def filter_logits(logits: Tensor, settings: SampleSettings) -> Tensor:
    """Temperature first, so that top-p and min-p see the distribution that is actually sampled."""
    logits = logits / settings.temperature
    logits = top_k_filter(logits, settings.top_k)
    logits = top_p_filter(logits, settings.top_p)
    return min_p_filter(logits, settings.min_p)


def draw(logits: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw: logits (B, K), uniforms (B,) in [0, 1) -> codes (B,) int64.

    fp64 so that a code with probability 0 (filtered to -inf) has a flat CDF step and can never be hit.
    """
    cdf = logits.double().softmax(dim=-1).cumsum(dim=-1)  # (B, K)
    total = cdf[:, -1:]  # (B, 1), 1 up to rounding
    # Strictly below the total, so the search always lands on a code with non-zero probability.
    target = torch.minimum(uniforms.double()[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)  # first code whose CDF exceeds the target


def choose(logits: Tensor, settings: SampleSettings, uniforms: Tensor) -> Tensor:
    """Guided logits (B, K) -> next codes (B,)."""
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    return draw(filter_logits(logits, settings), uniforms)


# ---------------------------------------------------------------------------------------------------
# Classifier-free guidance (Ho & Salimans 2022).


def cfg_scale_at(settings: SampleSettings, position: int, num_tokens: int) -> float:
    """Guidance scale for code `position` of `num_tokens`."""
    scale = settings.cfg_scale
    if settings.cfg_schedule == "constant":
        return scale
    if settings.cfg_schedule == "linear":
        # Weak guidance on the first codes, which fix the global layout, keeps samples diverse;
        # full guidance on the last ones sharpens detail.
        return 1.0 + (scale - 1.0) * position / max(num_tokens - 1, 1)
    start, end = settings.cfg_interval
    # Guidance only inside a window of positions (Kynkäänniemi et al. 2024, arXiv 2404.07724).
    return scale if start <= position / num_tokens < end else 1.0


def guide(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """uncond + scale * (cond - uncond); scale 1 returns cond itself and scale 0 returns uncond exactly."""
    if scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


def needs_guidance(settings: SampleSettings, num_tokens: int) -> bool:
    return any(cfg_scale_at(settings, i, num_tokens) != 1.0 for i in range(num_tokens))


# ---------------------------------------------------------------------------------------------------
# The decoding loop.


def seeded_uniforms(seeds: Sequence[int], num_tokens: int, device: torch.device) -> Tensor:
    """One generator per sample -> uniforms (B, L), drawn on the CPU so CPU and CUDA runs match."""
    rows = [torch.rand(num_tokens, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds]
    return torch.stack(rows).to(device)  # (B, L)


@torch.no_grad()
def decode(
    prior: Prior,
    labels: Tensor | None,
    num_tokens: int,
    settings: SampleSettings,
    seeds: Sequence[int],
    keep_logits: bool = False,
) -> Sampled:
    """Draw codes (B, L=num_tokens) with B = len(seeds); keep_logits also returns each step's guided logits.

    labels (B,) in [0, num_classes) or None (the null class; the start token of an unconditional prior).
    """
    if prior.training:
        raise RuntimeError("call prior.eval() before sampling: training mode turns on dropout and label dropout")
    if num_tokens < 1 or num_tokens > prior.cfg.seq_len:
        raise ValueError(f"num_tokens must be in [1, {prior.cfg.seq_len}] (the prior's seq_len), got {num_tokens}")
    B = len(seeds)
    if B == 0:
        raise ValueError("pass one seed per sample (seeds is empty)")
    device = next(prior.parameters()).device

    guided = needs_guidance(settings, num_tokens)
    if guided and labels is None:
        raise ValueError("classifier-free guidance needs labels; pass labels or set cfg_scale=1")
    prefix = prior.prefix(labels, B)  # (B, 1)
    if guided:
        # Batch doubling: rows [0, B) are conditional, rows [B, 2B) the same samples under the null class.
        prefix = torch.cat([prefix, prior.prefix(None, B)], dim=0)  # (2B, 1)

    uniforms = seeded_uniforms(seeds, num_tokens, device)  # (B, L)
    tokens = prefix  # (B or 2B, 1 + i): every id fed so far
    new = prefix  # the ids not yet in the cache
    cache = KVCache()
    codes, step_logits = [], []
    for i in range(num_tokens):
        if settings.use_cache:
            logits = prior.step(new, cache).logits
        else:
            logits = prior.step(tokens).logits
        logits = logits[:, -1].float()  # (B or 2B, K) fp32: the prediction for code i
        with torch.autocast(device_type=device.type, enabled=False):  # guidance and filters in fp32
            if guided:
                cond, uncond = logits.chunk(2, dim=0)  # (B, K) each
                logits = guide(cond, uncond, cfg_scale_at(settings, i, num_tokens))
            code = choose(logits, settings, uniforms[:, i])  # (B,)
        codes.append(code)
        if keep_logits:
            step_logits.append(logits)
        new = (torch.cat([code, code]) if guided else code)[:, None]  # (B or 2B, 1)
        if not settings.use_cache:
            tokens = torch.cat([tokens, new], dim=1)
    logits = torch.stack(step_logits, dim=1) if keep_logits else None  # (B, L, K)
    return Sampled(torch.stack(codes, dim=1), logits)  # codes (B, L)


def sample(
    prior: Prior,
    labels: Tensor | None,
    num_tokens: int,
    settings: SampleSettings,
    seeds: Sequence[int],
) -> Tensor:
    """Draw codes (B, num_tokens) int64 in [0, K), B = len(seeds). See `decode`."""
    return decode(prior, labels, num_tokens, settings, seeds).codes
