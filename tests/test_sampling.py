"""Sampling: kv cache == no cache, CFG endpoints and schedules, filters, per-sample seeds, unconditional mode."""

import pytest
import torch

from prior import PriorConfig, SampleSettings, build_prior, decode, sample
from prior.sampling import cfg_scale_at, choose, draw, guide, min_p_filter, top_k_filter, top_p_filter

K, L, C = 32, 12, 4  # codes, sequence length, classes


def tiny(num_classes: int = C):
    torch.manual_seed(0)
    prior = build_prior(PriorConfig(size="tiny", num_codes=K, seq_len=L, num_classes=num_classes))
    # Random init gives near-uniform logits; sharpen the head so greedy paths and CFG are non-trivial.
    with torch.no_grad():
        prior.net.to_logits.weight.mul_(20.0)
    return prior.eval()


LABELS = torch.tensor([0, 1, 2, 3])
SEEDS = [11, 22, 33, 44]


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cache_matches_no_cache(cfg_scale):
    prior = tiny()
    runs = {}
    for use_cache in (True, False):
        settings = SampleSettings(temperature=0.0, cfg_scale=cfg_scale, use_cache=use_cache)
        runs[use_cache] = decode(prior, LABELS, L, settings, SEEDS, keep_logits=True)
    torch.testing.assert_close(runs[True].logits, runs[False].logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(runs[True].codes, runs[False].codes)
    # Same with stochastic sampling: both paths draw the same codes from the same uniforms.
    stochastic = [sample(prior, LABELS, L, SampleSettings(cfg_scale=cfg_scale, use_cache=c), SEEDS) for c in (True, False)]
    assert torch.equal(*stochastic)


def test_guide_endpoints_are_exact():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, K, generator=g)
    assert guide(cond, uncond, 1.0) is cond
    assert torch.equal(guide(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(guide(cond, uncond, 2.0), 2 * cond - uncond)


def test_cfg_scale_one_and_zero_end_to_end():
    prior = tiny()
    # Scale 1: the conditional logits of the generated sequence, as teacher forcing computes them.
    one = decode(prior, LABELS, L, SampleSettings(cfg_scale=1.0), SEEDS, keep_logits=True)
    torch.testing.assert_close(one.logits, prior(one.codes, LABELS), atol=1e-4, rtol=1e-4)
    # Scale 0: the null-class (unconditional) logits, although labels were given.
    zero = decode(prior, LABELS, L, SampleSettings(cfg_scale=0.0), SEEDS, keep_logits=True)
    torch.testing.assert_close(zero.logits, prior(zero.codes, None), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(zero.logits, prior(zero.codes, LABELS), atol=1e-3)
    # Scale 3 really extrapolates: cond + 2 (cond - uncond).
    three = decode(prior, LABELS, L, SampleSettings(cfg_scale=3.0), SEEDS, keep_logits=True)
    cond, uncond = prior(three.codes, LABELS), prior(three.codes, None)
    torch.testing.assert_close(three.logits, uncond + 3.0 * (cond - uncond), atol=1e-3, rtol=1e-3)


def test_cfg_schedules():
    constant = SampleSettings(cfg_scale=4.0)
    assert [cfg_scale_at(constant, i, 5) for i in range(5)] == [4.0] * 5
    linear = SampleSettings(cfg_scale=4.0, cfg_schedule="linear")
    assert [cfg_scale_at(linear, i, 5) for i in range(5)] == [1.0, 1.75, 2.5, 3.25, 4.0]
    interval = SampleSettings(cfg_scale=4.0, cfg_schedule="interval", cfg_interval=(0.25, 0.75))
    assert [cfg_scale_at(interval, i, 8) for i in range(8)] == [1.0, 1.0, 4.0, 4.0, 4.0, 4.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="cfg_schedule"):
        SampleSettings(cfg_schedule="cosine")
    # Outside the window the guided logits are exactly the conditional ones.
    prior = tiny()
    out = decode(prior, LABELS, L, SampleSettings(cfg_scale=3.0, cfg_schedule="interval", cfg_interval=(0.5, 1.0)), SEEDS, keep_logits=True)
    cond = prior(out.codes, LABELS)
    torch.testing.assert_close(out.logits[:, : L // 2], cond[:, : L // 2], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out.logits[:, L // 2 :], cond[:, L // 2 :], atol=1e-3)


def draws(logits: torch.Tensor, settings: SampleSettings, n: int = 4000) -> torch.Tensor:
    """n codes drawn from one row of logits (K,) with n different uniforms."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return choose(logits.expand(n, -1), settings, u)


def row_logits() -> torch.Tensor:
    # Distinct, spread-out logits (no ties) so each allowed set is unambiguous.
    return torch.linspace(2.0, -2.0, K)[torch.randperm(K, generator=torch.Generator().manual_seed(5))]


def test_top_k_never_leaves_the_k_best():
    logits = row_logits()
    allowed = set(logits.topk(5).indices.tolist())
    drawn = set(draws(logits, SampleSettings(top_k=5)).tolist())
    assert drawn == allowed  # never outside, and every allowed code does occur
    assert torch.isinf(top_k_filter(logits[None], 5)).sum() == K - 5


def test_top_p_keeps_the_smallest_nucleus():
    logits = row_logits()
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    mass = probs[order].cumsum(0)
    n_keep = int((mass < 0.6).sum()) + 1  # smallest prefix holding >= 0.6
    allowed = set(order[:n_keep].tolist())
    drawn = set(draws(logits, SampleSettings(top_p=0.6)).tolist())
    assert drawn == allowed
    assert (~torch.isinf(top_p_filter(logits[None], 0.6))).sum() == n_keep


def test_min_p_drops_unlikely_codes():
    logits = row_logits()
    probs = logits.softmax(-1)
    allowed = set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())
    assert 1 < len(allowed) < K
    drawn = set(draws(logits, SampleSettings(min_p=0.3)).tolist())
    assert drawn == allowed
    assert (~torch.isinf(min_p_filter(logits[None], 0.3))).sum() == len(allowed)


def test_filters_compose_and_temperature_sharpens():
    logits = row_logits()
    both = set(draws(logits, SampleSettings(top_k=8, top_p=0.5)).tolist())
    assert both <= set(logits.topk(8).indices.tolist())
    greedy = draws(logits, SampleSettings(temperature=0.0), n=10)
    assert (greedy == logits.argmax()).all()
    cold = draws(logits, SampleSettings(temperature=0.01))  # top two logits differ by 0.13
    assert (cold == logits.argmax()).float().mean() > 0.99


def test_draw_follows_the_distribution():
    logits = row_logits()
    n = 20000
    u = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    freq = torch.bincount(draw(logits.expand(n, -1), u), minlength=K).double() / n
    assert (freq - logits.softmax(-1).double()).abs().max() < 0.015
    # Codes at -inf (here the first, the last and the top one) are never hit, even by the extreme uniforms.
    banned = torch.tensor([0, K - 1, int(logits.argmax())])
    masked = logits.index_fill(0, banned, float("-inf"))
    edges = torch.tensor([0.0, 1e-300, 0.5, 1.0 - 2**-53], dtype=torch.float64)
    assert not torch.isin(draw(masked.expand(4, -1), edges), banned).any()


def test_per_sample_seeds_are_reproducible_and_batch_independent():
    prior = tiny()
    settings = SampleSettings(cfg_scale=2.0, top_k=16)
    batch = sample(prior, LABELS, L, settings, SEEDS)
    assert batch.shape == (4, L) and batch.dtype == torch.long
    assert torch.equal(batch, sample(prior, LABELS, L, settings, SEEDS))
    # Sample 2 alone, and inside a different batch, gets the same codes as before.
    alone = sample(prior, LABELS[2:3], L, settings, SEEDS[2:3])
    assert torch.equal(alone[0], batch[2])
    shuffled = sample(prior, LABELS[[3, 2, 0]], L, settings, [SEEDS[3], SEEDS[2], SEEDS[0]])
    assert torch.equal(shuffled, batch[[3, 2, 0]])
    # Another seed changes the sample.
    assert not torch.equal(sample(prior, LABELS[2:3], L, settings, [999])[0], batch[2])


def test_unconditional_sampling():
    prior = tiny(num_classes=0)
    out = decode(prior, None, L, SampleSettings(), seeds=[0, 1, 2], keep_logits=True)
    assert out.codes.shape == (3, L) and 0 <= out.codes.min() and out.codes.max() < K
    torch.testing.assert_close(out.logits, prior(out.codes, None), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="labels"):
        sample(prior, None, L, SampleSettings(cfg_scale=2.0), seeds=[0])


def test_sampling_refuses_misuse():
    prior = tiny()
    with pytest.raises(RuntimeError, match="eval"):
        sample(prior.train(), LABELS, L, SampleSettings(), SEEDS)
    prior.eval()
    with pytest.raises(ValueError, match="num_tokens"):
        sample(prior, LABELS, L + 1, SampleSettings(), SEEDS)
    with pytest.raises(ValueError, match="top_p"):
        SampleSettings(top_p=0.0)
