"""Sampling codes from a Prior: filters, classifier-free guidance, a key/value cache, per-sample seeds.

Everything here is a pure function of (prior, labels, settings, seeds). A step of decoding is

    logits (B, K) --CFG--> guided --/temperature--> --top-k--> --top-p--> --min-p--> probs --> code

Randomness: each sample owns a torch.Generator seeded by its own seed, which draws that sample's L
uniforms up front; a code is drawn by inverting the CDF of its filtered distribution at that uniform.
So sample b's codes depend only on (seed_b, label_b), never on its batch-mates or on the batch size.

Precision: the caller may run the prior under bf16 autocast (pipelines/sample.py does on CUDA); the logits still
come out of an fp32 head (`Prior.step`), and guidance, filters and the draw run in fp32 with autocast off, since CFG
amplifies any rounding in cond - uncond by the guidance scale.

Speed: with `use_cache` each step feeds one id per row through a preallocated cache (`Prior.step`); on a GPU that
step is bound by launching its kernels from Python, so `cuda_graph` runs the same step as `DecodeStep`, a function
of fixed-shape buffers that is captured once per `decode` call and replayed for every code.
"""

from __future__ import annotations

import contextlib
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
    # decode with DecodeStep (static buffers; on a GPU one CUDA graph replayed per token, eagerly on the CPU); needs
    # use_cache. Same codes as the default loop on the CPU; on a GPU the attention kernel may round differently
    cuda_graph: bool = False

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
        if self.cuda_graph and not self.use_cache:
            raise ValueError("cuda_graph replays the kv-cache step: it needs use_cache=True")


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
    settings.cuda_graph decodes with `DecodeStep` (a CUDA graph on a GPU, eager on the CPU) instead of the loop below.
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
    if settings.cuda_graph:
        step = DecodeStep(prior, prefix, uniforms, settings, guided, keep_logits, graph=device.type == "cuda")
        for _ in range(num_tokens):
            step()
        return Sampled(step.codes, step.logits)
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


class DecodeStep:
    """The cached decode loop's step (one code for every sample) as a function of static buffers, so that a GPU
    can replay it as one CUDA graph instead of launching its ~hundred kernels from Python every token.

        step = DecodeStep(prior, prefix, uniforms, settings, guided, keep_logits, graph=True)
        for _ in range(L): step()        # step.codes (B, L) int64, step.logits (B, L, K) fp32 or None

    State, all on the prior's device with fixed shapes: `token` (R, 1) the ids fed next (the prefix, then each
    step's codes; R = 2B under CFG), `position` (1,) int64, a zeroed KVCache covering seq_len, the per-sample
    uniforms (B, L), the guidance scale of every position (L,), and the outputs `codes` / `logits`. `run` reads and
    advances them without a host sync or a data-dependent shape (Prior.static_step attends over the whole cache
    through a mask). With graph=True (CUDA only) the first call warms `run` up on a side stream and captures it
    into a torch.cuda.CUDAGraph (under the caller's autocast, with the autocast weight cache off, as capture
    needs); every call then replays it. With graph=False `run` runs eagerly: the CPU path, and the one tests
    compare with `decode`'s loop. Guidance, filters and the draw are `decode`'s own, in fp32; the guidance scale is
    applied as `torch.where(scale == 1, cond, uncond + scale * (cond - uncond))`, which is `guide` exactly.
    """

    WARMUP = 2  # eager steps on a side stream before capture (cuBLAS handles, kernel selection)

    def __init__(self, prior: Prior, prefix: Tensor, uniforms: Tensor, settings: SampleSettings, guided: bool,
                 keep_logits: bool = False, graph: bool = False):
        if graph and prefix.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the prior on a GPU, not {prefix.device}; use graph=False")
        self.prior, self.settings, self.guided = prior, settings, guided
        self.prefix = prefix  # (R, 1)
        self.uniforms = uniforms  # (B, L) fp64
        B, L = uniforms.shape
        self.num_tokens = L
        device = prefix.device
        self.scales = torch.tensor([cfg_scale_at(settings, i, L) for i in range(L)], dtype=torch.float32,
                                   device=device)  # (L,)
        self.token = prefix.clone()
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.cache = KVCache()  # allocated (zeroed) by the first run
        self.codes = torch.zeros(B, L, dtype=torch.long, device=device)
        self.logits = torch.zeros(B, L, prior.num_codes, device=device) if keep_logits else None
        self.taken = 0  # steps taken since the last reset (host side: the buffers are never read back)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.want_graph = graph
        autocast = device.type == "cuda" and torch.is_autocast_enabled("cuda")
        self.autocast = torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type), enabled=autocast,
                                       cache_enabled=False) if autocast else contextlib.nullcontext()

    def reset(self) -> None:
        self.token.copy_(self.prefix)
        self.position.zero_()
        self.taken = 0

    @torch.no_grad()
    def run(self) -> None:
        """One decode step on the buffers: code `position` for every sample, then advance."""
        logits = self.prior.static_step(self.token, self.position, self.cache)  # (R, K) fp32
        with torch.autocast(device_type=self.token.device.type, enabled=False):  # guidance and filters in fp32
            if self.guided:
                cond, uncond = logits.chunk(2, dim=0)  # (B, K) each
                scale = self.scales.index_select(0, self.position)  # (1,)
                logits = torch.where(scale == 1.0, cond, uncond + scale * (cond - uncond))
            code = choose(logits, self.settings, self.uniforms.index_select(1, self.position).squeeze(1))  # (B,)
        self.codes.index_copy_(1, self.position, code[:, None])
        if self.logits is not None:
            self.logits.index_copy_(1, self.position, logits[:, None])
        self.token.copy_((torch.cat([code, code]) if self.guided else code)[:, None])
        self.position.add_(1)

    def capture(self) -> None:
        """Warm `run` up on a side stream, capture it into a CUDA graph, and reset the state. The warm-up also
        allocates the cache, outside the graph (allocated inside, its zero fill would be replayed every step)."""
        with torch.cuda.device(self.token.device), self.autocast:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(self.WARMUP):
                    self.reset()
                    self.run()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.run()
        self.reset()

    def __call__(self) -> None:
        if self.taken == self.num_tokens:
            raise RuntimeError(f"all {self.num_tokens} codes are drawn; reset() to decode again")
        if self.want_graph and self.graph is None:
            self.capture()
        if self.graph is not None:
            with torch.cuda.device(self.token.device):
                self.graph.replay()
        else:
            self.run()
        self.taken += 1


def sample(
    prior: Prior,
    labels: Tensor | None,
    num_tokens: int,
    settings: SampleSettings,
    seeds: Sequence[int],
) -> Tensor:
    """Draw codes (B, num_tokens) int64 in [0, K), B = len(seeds). See `decode`."""
    return decode(prior, labels, num_tokens, settings, seeds).codes
