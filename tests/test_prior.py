"""The prior model: vocabulary layout, teacher forcing, label dropout, unconditional mode, and that it learns."""

import math

import pytest
import torch

from prior import PRIOR_SIZES, KVCache, PriorConfig, build_prior, next_code_loss

K, L, C = 32, 16, 4  # codes, sequence length, classes


def tiny(num_classes: int = C, **kwargs):
    torch.manual_seed(0)
    return build_prior(PriorConfig(size="tiny", num_codes=K, seq_len=L, num_classes=num_classes, **kwargs))


def structured_codes(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences c_{i+1} = c_i + (label + 1) mod K from a random start: learnable, label-dependent."""
    labels = torch.randint(0, C, (n,), generator=generator)
    start = torch.randint(0, K, (n, 1), generator=generator)
    steps = torch.arange(L)[None, :] * (labels[:, None] + 1)  # (n, L)
    return (start + steps) % K, labels


def test_vocabulary_layout():
    cfg = PriorConfig(num_codes=K, seq_len=L, num_classes=C)
    assert cfg.null_id == K + C and cfg.vocab_size == K + C + 1
    prior = build_prior(cfg)
    assert prior.net.token_emb.emb.num_embeddings == K + C + 1
    assert prior.net.to_logits.out_features == K  # class and null ids can never be predicted


def test_sizes_registry_and_config_errors():
    assert {"tiny", "small", "gpt-b"} <= set(PRIOR_SIZES)
    gpt_b = PRIOR_SIZES["gpt-b"]
    assert (gpt_b.depth, gpt_b.dim, gpt_b.heads) == (12, 768, 12)
    with pytest.raises(ValueError, match="unknown prior size"):
        PriorConfig(size="huge")
    with pytest.raises(ValueError, match="label_dropout"):
        PriorConfig(label_dropout=1.5)


def test_forward_shapes_and_causality():
    prior = tiny().eval()
    g = torch.Generator().manual_seed(0)
    codes, labels = structured_codes(3, g)
    logits = prior(codes, labels)
    assert logits.shape == (3, L, K)
    # Position i sees only the prefix and codes < i: changing code j moves positions > j only.
    j = 5
    changed = codes.clone()
    changed[:, j] = (changed[:, j] + 1) % K
    logits2 = prior(changed, labels)
    torch.testing.assert_close(logits2[:, : j + 1], logits[:, : j + 1])
    assert not torch.allclose(logits2[:, j + 1 :], logits[:, j + 1 :])
    # The label is visible from position 0.
    other = prior(codes, (labels + 1) % C)
    assert not torch.allclose(other[:, 0], logits[:, 0])


def test_step_matches_teacher_forcing():
    prior = tiny().eval()
    codes, labels = structured_codes(2, torch.Generator().manual_seed(1))
    tokens = torch.cat([prior.prefix(labels, 2), codes[:, :-1]], dim=1)  # (2, L)
    torch.testing.assert_close(prior.step(tokens).logits, prior(codes, labels))
    # The same logits, fed in three chunks through the key/value cache.
    cache = KVCache()
    parts = [prior.step(chunk, cache).logits for chunk in tokens.split([1, 6, L - 7], dim=1)]
    assert cache.length == L
    torch.testing.assert_close(torch.cat(parts, dim=1), prior(codes, labels), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="seq_len"):
        prior.step(tokens[:, :1], cache)  # full


def test_label_dropout_uses_null_class():
    labels = torch.arange(C).repeat(64)  # (256,)
    always = tiny(label_dropout=1.0).train()
    assert (always.prefix(labels, len(labels)) == K + C).all()
    never = tiny(label_dropout=0.0).train()
    assert torch.equal(never.prefix(labels, len(labels))[:, 0], labels + K)
    half = tiny(label_dropout=0.5).train()
    ids = half.prefix(labels, len(labels), generator=torch.Generator().manual_seed(0))[:, 0]
    dropped = ids == K + C
    assert 0.35 < dropped.float().mean() < 0.65
    assert torch.equal(ids[~dropped], labels[~dropped] + K)  # kept labels are untouched
    # Evaluation never drops labels, and labels=None always means the null class.
    assert torch.equal(half.eval().prefix(labels, len(labels))[:, 0], labels + K)
    assert (half.prefix(None, 3) == K + C).all()


def test_unconditional_mode():
    prior = tiny(num_classes=0).eval()
    assert prior.cfg.vocab_size == K + 1 and prior.cfg.null_id == K  # the start token
    codes, _ = structured_codes(2, torch.Generator().manual_seed(2))
    assert prior(codes).shape == (2, L, K)
    out = next_code_loss(prior(codes), codes)
    assert math.isfinite(out.loss.item())
    with pytest.raises(ValueError, match="unconditional"):
        prior(codes, torch.zeros(2, dtype=torch.long))


def test_bad_inputs_fail_loudly():
    prior = tiny().eval()
    codes, labels = structured_codes(2, torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="num_codes"):
        prior(codes + K, labels)
    with pytest.raises(ValueError, match="labels must lie"):
        prior(codes, labels + C)
    with pytest.raises(ValueError, match="seq_len"):
        prior(torch.zeros(2, L + 1, dtype=torch.long), labels)


def test_fifty_steps_lower_the_loss():
    prior = tiny().train()
    g = torch.Generator().manual_seed(0)
    codes, labels = structured_codes(512, g)
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    losses, accs = [], []
    for step in range(50):
        idx = torch.randint(0, len(codes), (32,), generator=g)
        out = next_code_loss(prior(codes[idx], labels[idx]), codes[idx])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        accs.append(out.accuracy.item())
    assert abs(losses[0] - math.log(K)) < 1.0  # starts near chance
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, f"loss went {first:.3f} -> {last:.3f}"
    assert sum(accs[-5:]) / 5 > sum(accs[:5]) / 5 + 0.2


def test_decode_logits_are_fp32_under_bf16_autocast():
    """Sampling reads Prior.step's logits: under bf16 autocast the trunk may run in bf16, but the head must not."""
    import torch.nn.functional as F

    prior = tiny().eval()
    codes, labels = structured_codes(2, torch.Generator().manual_seed(1))
    tokens = torch.cat([prior.prefix(labels, 2), codes[:, :-1]], dim=1)  # (2, L)
    weight = prior.net.to_logits.weight
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        hidden = prior.net(tokens, return_embeddings=True)  # (2, L, dim) final-normed, from the bf16 trunk
        uncached = prior.step(tokens).logits
        cache = KVCache()
        cached = torch.cat([prior.step(chunk, cache).logits for chunk in tokens.split([1, L - 1], dim=1)], dim=1)
    assert uncached.dtype == cached.dtype == torch.float32
    with torch.no_grad():
        fp32_head = F.linear(hidden.float(), weight)  # outside autocast: a true fp32 matmul
        bf16_head = F.linear(hidden.bfloat16(), weight.bfloat16()).float()
    torch.testing.assert_close(uncached, fp32_head, rtol=1e-6, atol=1e-6)
    # negative control: a bf16 head is off by far more than that tolerance
    assert (bf16_head - fp32_head).abs().max() > 1e-3
    # the cached path uses the same fp32 head (its bf16 trunk rounds differently, hence the looser tolerance)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0.1)
