"""The SimVQ quantizer family: round trip, exact loss and gradients, bounded-memory search, codebook health."""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from pipelines.checkpoint import load_checkpoint, save_checkpoint
from tokenizer import TokenizerConfig, build_tokenizer
from tokenizer.quantizers import QUANTIZERS, CodebookUsage, build_quantizer, nearest_codes
from tokenizer.quantizers.adapters import LibraryQuantizer

# nearest-neighbour quantizers; the FSQ/LFQ adapters round instead (tests/test_quantizer_adapters.py)
NEAREST = sorted(n for n, cls in QUANTIZERS.items() if not issubclass(cls, LibraryQuantizer))
# K for registry entries that only accept some K (fsq: a product of the paper's levels; lfq: a power of two);
# 64 = 6 LFQ bits and 1000 = 4 FSQ levels, so that at dim=8 both adapters project D -> codebook dims -> D.
NUM_CODES = {"fsq": 1000, "lfq": 64}


def build_any(name: str, dim: int = 8, num_codes: int = 1024):
    """A registry quantizer at a K it accepts; skips the adapters when vector-quantize-pytorch is missing."""
    if issubclass(QUANTIZERS[name], LibraryQuantizer):
        pytest.importorskip("vector_quantize_pytorch")
    return build_quantizer(name, dim=dim, num_codes=NUM_CODES.get(name, num_codes))


def test_registry_holds_the_paper_quantizers_and_adapters():
    assert {"ema-vq", "simvq", "vq"} <= set(NEAREST) and {"fsq", "lfq"} <= set(QUANTIZERS) - set(NEAREST)


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
    z, cb = torch.randn(2048, 8), torch.randn(1024, 8) * 8 ** -0.5
    ref = nearest_codes(z, cb)
    assert ref.dtype == torch.long and ref.shape == (2048,)
    assert torch.equal(ref, ((z.double()[:, None] - cb.double()[None]) ** 2).sum(-1).argmin(1))
    # negative control: distances in bf16 do pick other codes for these inputs, so the checks below can fail
    bf16_distances = (cb.bfloat16() ** 2).sum(1) - 2 * z.bfloat16() @ cb.bfloat16().T
    assert (bf16_distances.argmin(1) != ref).sum() > 10
    with torch.autocast("cpu", torch.bfloat16):  # the caller's autocast does not reach the distance GEMM
        assert torch.equal(nearest_codes(z, cb), ref)
        assert torch.equal(nearest_codes(z, cb, chunk_elems=4096), ref)
    # bf16 inputs are searched as their exact fp32 values, not with bf16 arithmetic
    zb, cbb = z.bfloat16(), cb.bfloat16()
    assert torch.equal(nearest_codes(zb, cbb), nearest_codes(zb.float(), cbb.float()))
    with torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(nearest_codes(zb, cbb), nearest_codes(zb.float(), cbb.float()))


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_codes_do_not_depend_on_autocast(name):
    """SimVQ's W(C) and the adapters' projections used to run in the caller's bf16: other codes than fp32 (0.7% at
    K = 16,384), and the eval cache then served that bf16 codebook to later fp32 calls."""
    torch.manual_seed(0)
    q = build_any(name)
    z = torch.randn(2, 8, 32, 32)  # N = 2,048 latents
    train_fp32 = copy.deepcopy(q)(z)  # copies: a training forward moves EMA-VQ's codebook
    with torch.autocast("cpu", torch.bfloat16):
        train_bf16 = copy.deepcopy(q)(z)
    assert torch.equal(train_bf16.codes, train_fp32.codes)
    assert train_bf16.z_q.dtype == torch.float32  # z_q follows z's dtype, not autocast's
    torch.testing.assert_close(train_bf16.z_q, train_fp32.z_q)
    torch.testing.assert_close(train_bf16.loss, train_fp32.loss)

    fresh = copy.deepcopy(q).eval()
    q.eval()
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            eval_bf16 = q(z)
            assert q.codebook.dtype == torch.float32
        eval_fp32 = q(z)  # after an autocast call: nothing cached from it may differ
        ref = fresh(z)
        assert torch.equal(eval_bf16.codes, ref.codes) and torch.equal(eval_fp32.codes, ref.codes)
        assert torch.equal(q.codebook, fresh.codebook)
        torch.testing.assert_close(eval_fp32.z_q, ref.z_q, rtol=0, atol=0)
        # z_q holds the fp32 codebook rows (up to the straight-through's fp32 rounding)
        torch.testing.assert_close(eval_fp32.z_q, q.decode_codes(eval_fp32.codes), rtol=0, atol=1e-6)
        with torch.autocast("cpu", torch.bfloat16):
            assert q.decode_codes(ref.codes).dtype == torch.float32
        # a bf16 graph stays bf16 after the quantizer
        assert q(z.bfloat16()).z_q.dtype == torch.bfloat16


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_state_dict_survives_weights_only_load(name):
    """nn.Module._version is the state_dict format number PyTorch writes into every state_dict's metadata; a method
    of that name made torch.save pickle the whole module and torch.load(weights_only=True) refuse the file."""
    torch.manual_seed(0)
    q = build_any(name)
    q(torch.randn(2, 8, 3, 3))  # a training step: EMA-VQ's buffers move
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    torch.manual_seed(1)
    q2 = build_any(name)
    q2.load_state_dict(loaded)
    for k, v in q.state_dict().items():
        assert torch.equal(q2.state_dict()[k], v), k
    q.eval(), q2.eval()
    with torch.no_grad():
        z = torch.randn(2, 8, 5)
        assert torch.equal(q2(z).codes, q(z).codes)


def test_tokenizer_state_dict_survives_weights_only_load():
    torch.manual_seed(0)
    model = build_tokenizer(TokenizerConfig(size="tiny", num_codes=64))
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    other = build_tokenizer(TokenizerConfig(size="tiny", num_codes=64))
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(other.eval().encode(x), model.eval().encode(x))


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


def test_simvq_data_init_fits_the_codebook_to_the_latents_for_n_batches():
    """Latents that are one offset plus tiny variation (as SEANet's at init) all fall on one code of a fresh SimVQ;
    with data_init the effective codebook takes their per-dim mean and spread, for the first N training batches only,
    counted in a saved buffer; eval calls never refit."""
    torch.manual_seed(0)
    z = torch.randn(8, 16, 50) * 1e-3 + 0.5
    plain = build_quantizer("simvq", dim=16, num_codes=256).train()
    assert plain(z).codes.unique().numel() == 1
    q = build_quantizer("simvq", dim=16, num_codes=256, data_init=2).train()
    assert q(z).codes.unique().numel() > 50
    cb = q.codebook.detach()
    assert torch.allclose(cb.mean(0), z.mean(dim=(0, 2)), atol=1e-5)
    assert torch.allclose(cb.std(0), z.transpose(0, 1).flatten(1).std(1), rtol=0.05)
    q.eval()
    q(z * 3)  # eval: no refit
    assert int(q.data_init_done) == 1 and torch.equal(q.codebook, cb)
    q.train()
    q(z + 1)
    q(z + 2)  # the third training batch is past N = 2: W and b stay where the second put them
    assert int(q.data_init_done) == 2 and torch.allclose(q.codebook.mean(0), (z + 1).mean(dim=(0, 2)), atol=1e-5)
    restored = build_quantizer("simvq", dim=16, num_codes=256, data_init=2)
    restored.load_state_dict(q.state_dict())  # the count travels with the weights: a resumed run does not refit
    assert int(restored.data_init_done) == 2
    assert "data_init_done" not in plain.state_dict()  # off: the state dict is the paper's (official conversions)
