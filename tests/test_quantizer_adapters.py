"""FSQ and LFQ (vector-quantize-pytorch) on the quantizer contract: round trip, shapes, gradients, K checks."""
import math
import subprocess
import sys

import pytest
import torch

from tokenizer.quantizers import QUANTIZERS, build_quantizer
from tokenizer.quantizers.adapters import FSQ_LEVELS

pytest.importorskip("vector_quantize_pytorch")

# (name, dim, K, kwargs): with and without the library's D <-> codebook-dim projections
CASES = [
    ("fsq", 16, 1000, {}),                       # levels [8, 5, 5, 5], projected 16 -> 4 -> 16
    ("fsq", 3, 240, {}),                         # levels [8, 6, 5], no projection
    ("fsq", 8, 75, {"levels": [5, 5, 3]}),       # explicit levels
    ("lfq", 16, 256, {}),                        # 8 bits, projected
    ("lfq", 4, 16, {"commitment_loss_weight": 0.25}),  # 4 bits, no projection
]
IDS = [f"{n}-D{d}-K{k}" for n, d, k, _ in CASES]


def test_registered_and_import_is_lazy():
    assert {"fsq", "lfq"} <= set(QUANTIZERS)
    # importing the registry must not pull the optional dependency in: only building an adapter does
    code = ("import sys, tokenizer.quantizers; assert 'vector_quantize_pytorch' not in sys.modules; "
            "tokenizer.quantizers.build_quantizer('fsq', dim=4, num_codes=240); "
            "assert 'vector_quantize_pytorch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("grid", [(5,), (3, 4)])
@pytest.mark.parametrize("name,dim,k,kwargs", CASES, ids=IDS)
def test_round_trip_decode_codes_equals_forward(name, dim, k, kwargs, grid):
    torch.manual_seed(0)
    q = build_quantizer(name, dim=dim, num_codes=k, **kwargs)
    assert q.num_codes == k and q.dim == dim
    z = torch.randn(2, dim, *grid)
    out = q(z)
    assert out.z_q.shape == z.shape and out.codes.shape == (2, *grid) and out.codes.dtype == torch.long
    assert out.loss.shape == () and torch.isfinite(out.loss)
    q.eval()
    with torch.no_grad():
        again = q(z)
        assert torch.equal(again.codes, out.codes)  # the code choice does not depend on the mode
        assert 0 <= int(again.codes.min()) and int(again.codes.max()) < k
        assert torch.allclose(q.decode_codes(again.codes), again.z_q, atol=1e-6)
        cb = q.codebook
        assert cb.shape == (k, dim)
        # the codebook is what decode_codes gives for every code, in order
        assert torch.allclose(cb[again.codes].movedim(-1, 1), again.z_q, atol=1e-6)
        assert torch.unique(cb, dim=0).shape[0] == k  # K distinct codes


@pytest.mark.parametrize("name,dim,k,kwargs", CASES, ids=IDS)
def test_gradients_reach_input_and_projections(name, dim, k, kwargs):
    torch.manual_seed(0)
    q = build_quantizer(name, dim=dim, num_codes=k, **kwargs)
    z = torch.randn(2, dim, 3, 4, requires_grad=True)
    out = q(z)
    (out.loss + (out.z_q * torch.randn_like(out.z_q)).sum()).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    for n, p in q.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_fsq_loss_is_zero_and_lfq_loss_is_the_entropy_aux_loss():
    torch.manual_seed(0)
    fsq = build_quantizer("fsq", dim=8, num_codes=1000)
    assert fsq.levels == [8, 5, 5, 5] and fsq(torch.randn(2, 8, 5)).loss.item() == 0.0
    lfq = build_quantizer("lfq", dim=8, num_codes=64, entropy_loss_weight=0.5)
    z = torch.randn(2, 8, 5)
    _, _, aux = lfq.inner(z.transpose(1, 2))  # the library on (B, N, D) directly
    assert torch.allclose(lfq(z).loss, aux) and aux.abs() > 0
    assert lfq.eval()(z).loss.item() == 0.0  # no aux loss outside training, as in the library


def test_unsupported_num_codes_is_a_clear_error():
    with pytest.raises(ValueError, match=r"supported K.*\[240, 1000, 4375, 15360, 64000\]"):
        build_quantizer("fsq", dim=8, num_codes=37)
    with pytest.raises(ValueError, match="use num_codes=1000"):  # 2^10 is the paper's row, but it spans 1000 codes
        build_quantizer("fsq", dim=8, num_codes=1024)
    with pytest.raises(ValueError, match=r"give K = 75 codes, not num_codes=64"):
        build_quantizer("fsq", dim=8, num_codes=64, levels=[5, 5, 3])
    with pytest.raises(ValueError, match="power of two.*256 or 512"):
        build_quantizer("lfq", dim=8, num_codes=300)
    with pytest.raises(ValueError, match=r"sets \['channel_first'\] itself"):
        build_quantizer("lfq", dim=8, num_codes=16, channel_first=True)
    q = build_quantizer("fsq", dim=4, num_codes=240)
    with pytest.raises(ValueError, match=r"\[0, 240\)"):
        q.decode_codes(torch.tensor([[240]]))
    assert all(math.prod(v) == k for k, v in FSQ_LEVELS.items())


def test_eval_codebook_cache_follows_projection_updates_and_state_dict():
    torch.manual_seed(0)
    q = build_quantizer("lfq", dim=8, num_codes=32).eval()
    z = torch.randn(2, 8, 6)
    with torch.no_grad():
        a = q.codebook
        assert q.codebook is a  # cached while the projection is unchanged
        q.inner.project_out.weight.add_(1.0)
        assert not torch.allclose(q.codebook, a)
        torch.manual_seed(1)
        q2 = build_quantizer("lfq", dim=8, num_codes=32).eval()
        q2.load_state_dict(q.state_dict())
        assert torch.equal(q2(z).codes, q(z).codes) and torch.equal(q2.codebook, q.codebook)
