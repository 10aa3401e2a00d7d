"""The SimVQ quantizer family: round trip, exact loss and gradients, bounded-memory search, codebook health."""
import math

import pytest
import torch
import torch.nn.functional as F

from pipelines.checkpoint import load_checkpoint, save_checkpoint
from tokenizer.quantizers import QUANTIZERS, CodebookUsage, build_quantizer, nearest_codes


# nearest-neighbour quantizers; the FSQ/LFQ adapters round instead (tests/test_quantizer_adapters.py)
NEAREST = ["ema-vq", "simvq", "vq"]


def test_registry_holds_the_paper_quantizers_and_adapters():
    assert set(NEAREST) | {"fsq", "lfq"} <= set(QUANTIZERS)


@pytest.mark.parametrize("name", NEAREST)
@pytest.mark.parametrize("grid", [(5,), (3, 4)])
def test_round_trip_decode_codes_equals_forward(name, grid):
    torch.manual_seed(0)
    q = build_quantizer(name, dim=16, num_codes=37)
    z = torch.randn(2, 16, *grid)
    out = q(z)
    assert out.z_q.shape == z.shape and out.codes.shape == (2, *grid) and out.codes.dtype == torch.long
    q.eval()
    with torch.no_grad():
        again = q(z)
        assert torch.allclose(q.decode_codes(again.codes), again.z_q, atol=1e-6)
        # the code really is the nearest row of the effective codebook
        flat = z.movedim(1, -1).reshape(-1, 16)
        brute = torch.cdist(flat.double(), q.codebook.double()).argmin(1)
        assert torch.equal(again.codes.reshape(-1), brute)


def test_simvq_codebook_is_frozen_buffer_and_survives_save_load(tmp_path):
    torch.manual_seed(0)
    q = build_quantizer("simvq", dim=8, num_codes=64)
    names = [n for n, _ in q.named_parameters()]
    assert names == ["proj.weight", "proj.bias"], names  # C is not something an optimiser can see
    assert "frozen_codebook" in q.state_dict()
    c = q.frozen_codebook.clone()
    assert abs(c.std().item() - 8 ** -0.5) < 0.05  # N(0, 1/d)
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        q(torch.randn(4, 8, 3, 3)).loss.backward()
        opt.step()
    assert torch.equal(q.frozen_codebook, c)
    save_checkpoint(tmp_path / "ck", config={"kind": "test"}, weights={"model": q.state_dict()})
    torch.manual_seed(123)  # a fresh build draws a different C ...
    q2 = build_quantizer("simvq", dim=8, num_codes=64)
    assert not torch.equal(q2.frozen_codebook, c)
    _, w = load_checkpoint(tmp_path / "ck")
    q2.load_state_dict(w["model"])  # ... and loading restores the exact one
    assert torch.equal(q2.frozen_codebook, c)
    assert torch.equal(q2.codebook, q.codebook)


def test_simvq_loss_and_gradients_match_hand_computation():
    torch.manual_seed(0)
    beta = 0.25
    q = build_quantizer("simvq", dim=6, num_codes=50, beta=beta)
    z = torch.randn(3, 6, 4, requires_grad=True)
    g = torch.randn(3, 6, 4)  # upstream gradient into z_q from a decoder
    out = q(z)
    (out.loss + (out.z_q * g).sum()).backward()

    z2 = z.detach().clone().requires_grad_(True)
    Q = q.proj(q.frozen_codebook)  # (K, D)
    flat = z2.movedim(1, -1).reshape(-1, 6)
    idx = ((flat[:, None, :] - Q[None]) ** 2).sum(-1).argmin(1)
    zq = Q[idx]
    commit = beta * ((zq.detach() - flat) ** 2).mean()
    codebook = ((zq - flat.detach()) ** 2).mean()
    assert torch.allclose(out.loss, commit + codebook)

    # W is trained by the codebook term alone: z_q's straight-through path carries no gradient into W.
    w_grad = torch.autograd.grad(codebook, [q.proj.weight, q.proj.bias], retain_graph=True)
    assert torch.allclose(q.proj.weight.grad, w_grad[0], atol=1e-6)
    assert torch.allclose(q.proj.bias.grad, w_grad[1], atol=1e-6)
    # The encoder output gets the beta term plus the decoder gradient passed straight through.
    (z_grad,) = torch.autograd.grad(commit, z2)
    assert torch.allclose(z.grad, z_grad + g, atol=1e-6)


def test_simvq_options_bias_and_codebook_dim():
    q = build_quantizer("simvq", dim=8, num_codes=10, bias=False, codebook_dim=4)
    assert q.proj.bias is None and q.frozen_codebook.shape == (10, 4) and q.codebook.shape == (10, 8)


def test_rotation_trick_keeps_values_and_changes_gradients():
    torch.manual_seed(0)
    z = torch.randn(2, 8, 5, requires_grad=True)
    plain = build_quantizer("simvq", dim=8, num_codes=20)
    rot = build_quantizer("simvq", dim=8, num_codes=20, rotation_trick=True)
    rot.load_state_dict(plain.state_dict())
    a, b = plain(z), rot(z)
    assert torch.equal(a.codes, b.codes)
    assert torch.allclose(a.z_q, b.z_q, atol=1e-5)
    g = torch.randn_like(z)
    (ga,) = torch.autograd.grad((a.z_q * g).sum(), z)
    (gb,) = torch.autograd.grad((b.z_q * g).sum(), z)
    assert torch.allclose(ga, g) and not torch.allclose(gb, g)


def test_ema_vq_moves_codes_towards_assigned_means():
    torch.manual_seed(0)
    q = build_quantizer("ema-vq", dim=4, num_codes=8, decay=0.5)
    z = torch.randn(1, 4, 64) + 3.0
    before = q.codebook.clone()
    codes = q(z).codes.reshape(-1)
    used = codes.unique()
    flat = z.movedim(1, -1).reshape(-1, 4)
    for k in used:
        mean = flat[codes == k].mean(0)
        assert (q.codebook[k] - mean).norm() < (before[k] - mean).norm()
    assert [n for n, _ in q.named_parameters()] == []  # nothing for an optimiser: EMA only
    out = q(z)
    assert torch.allclose(out.loss, 0.25 * F.mse_loss(z, out.z_q.detach()))


def test_vq_is_trained_through_the_codebook_loss():
    q = build_quantizer("vq", dim=4, num_codes=16)
    q(torch.randn(2, 4, 3)).loss.backward()
    assert q.embedding.grad is not None and q.embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("k,chunk", [(1000, 97), (1000, 1000), (257, 64), (64, 1 << 20)])
def test_chunked_search_matches_brute_force(k, chunk):
    torch.manual_seed(k)
    z, cb = torch.randn(300, 16), torch.randn(k, 16)
    brute = ((z.double()[:, None] - cb.double()[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(nearest_codes(z, cb, chunk_elems=chunk), brute)


def test_chunked_search_breaks_ties_like_one_argmin():
    torch.manual_seed(0)
    base = torch.randn(10, 8)
    # every code appears 3 times, at indices far apart so that duplicates straddle tile boundaries
    cb = torch.cat([base, base, base])  # (30, 8): copies at i, i+10, i+20
    z = base + 0.01 * torch.randn(10, 8)
    for chunk in (7, 11, 30, 1 << 20):
        assert torch.equal(nearest_codes(z, cb, chunk_elems=chunk), torch.arange(10))


def test_search_is_fp32_under_bf16_inputs():
    torch.manual_seed(0)
    z, cb = torch.randn(64, 16), torch.randn(500, 16)
    ref = nearest_codes(z, cb)
    assert torch.equal(nearest_codes(z, cb.bfloat16().float()), nearest_codes(z.float(), cb.bfloat16().float()))
    assert nearest_codes(z.bfloat16(), cb).dtype == torch.long and ref.shape == (64,)


def test_usage_on_known_streams():
    u = CodebookUsage(8)
    assert u.perplexity == 0.0 and u.utilisation == 0.0
    u.update(torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]))
    assert u.utilisation == 1.0 and u.dead == 0 and math.isclose(u.perplexity, 8.0)
    u.reset()
    u.update(torch.tensor([[3, 3], [3, 3]]))
    assert u.utilisation == 1 / 8 and u.dead == 7 and math.isclose(u.perplexity, 1.0)
    u.update(torch.tensor([5, 5, 5, 5]))
    assert math.isclose(u.perplexity, 2.0) and u.used == 2
    assert u.summary("val/") == {"val/utilisation": 0.25, "val/perplexity": pytest.approx(2.0), "val/dead_codes": 6.0}


def test_simvq_eval_codebook_cache_follows_weight_updates():
    q = build_quantizer("simvq", dim=4, num_codes=8).eval()
    with torch.no_grad():
        a = q.codebook
        assert q.codebook is a  # cached while W is unchanged
        q.proj.weight.add_(1.0)
        assert not torch.allclose(q.codebook, a)
