"""The static-buffer decode step (prior.sampling.DecodeStep, what a GPU replays as a CUDA graph) picks the codes of
the eager kv-cache loop: greedy, seeded, with CFG and its schedules, filters, unconditional; the masked cache positions
weigh nothing. The capture itself needs a GPU (the last test; skipped here)."""

import pytest
import torch

from prior import KVCache, Prior, PriorConfig, SampleSettings, build_prior, decode
from prior.sampling import DecodeStep, seeded_uniforms

K, L, C = 32, 12, 4  # codes, sequence length, classes
LABELS = torch.tensor([0, 1, 2, 3])
SEEDS = [11, 22, 33, 44]


def tiny(num_classes: int = C, seq_len: int = L) -> Prior:
    torch.manual_seed(0)
    prior = build_prior(PriorConfig(size="tiny", num_codes=K, seq_len=seq_len, num_classes=num_classes))
    with torch.no_grad():  # random init gives near-uniform logits; sharpen the head so the paths mean something
        prior.net.to_logits.weight.mul_(20.0)
    return prior.eval()


SETTINGS = {
    "greedy": dict(temperature=0.0),
    "seeded": dict(),
    "seeded top-k/p, min-p, temperature": dict(temperature=0.8, top_k=8, top_p=0.9, min_p=0.05),
    "greedy CFG 3": dict(temperature=0.0, cfg_scale=3.0),
    "seeded CFG 1.5": dict(cfg_scale=1.5),
    "seeded CFG 0 (unconditional rows)": dict(cfg_scale=0.0),
    "seeded CFG linear": dict(cfg_scale=4.0, cfg_schedule="linear", top_k=10),
    "seeded CFG interval": dict(cfg_scale=2.0, cfg_schedule="interval", cfg_interval=(0.25, 0.75)),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_static_step_picks_the_eager_loop_s_codes(name):
    prior = tiny()
    eager = decode(prior, LABELS, L, SampleSettings(**SETTINGS[name]), SEEDS, keep_logits=True)
    static = decode(prior, LABELS, L, SampleSettings(cuda_graph=True, **SETTINGS[name]), SEEDS, keep_logits=True)
    assert torch.equal(static.codes, eager.codes)
    torch.testing.assert_close(static.logits, eager.logits, atol=1e-4, rtol=1e-4)
    assert len(set(eager.codes.flatten().tolist())) > 3  # not a degenerate path


def test_unconditional_prior_and_a_shorter_sequence_than_seq_len():
    prior = tiny(num_classes=0, seq_len=L + 4)  # cache longer than the codes drawn: the tail stays masked
    for extra in ({}, {"temperature": 0.0}):
        runs = [decode(prior, None, L, SampleSettings(cuda_graph=graph, **extra), SEEDS).codes for graph in (0, 1)]
        assert torch.equal(*runs)


def test_decode_with_cuda_graph_runs_only_the_static_step(monkeypatch):
    """The setting really switches paths (the eager loop's Prior.step is never called), and on the CPU the step
    runs eagerly: no graph is captured."""
    prior = tiny()
    calls = []
    monkeypatch.setattr(Prior, "step", lambda *a, **k: pytest.fail("decode ran the eager loop"))
    monkeypatch.setattr(DecodeStep, "capture", lambda self: pytest.fail("captured a CUDA graph on the CPU"))
    real = Prior.static_step
    monkeypatch.setattr(Prior, "static_step", lambda self, *a: calls.append(1) or real(self, *a))
    decode(prior, LABELS, L, SampleSettings(cuda_graph=True), SEEDS)
    assert len(calls) == L


def test_masked_cache_positions_weigh_nothing():
    """What a replayed graph finds in the cache after the current position (earlier runs' keys and values) must not
    change the step: fill it with large values and compare with a clean cache."""
    prior = tiny()
    tokens = torch.tensor([[K + 1], [K + 2]])  # class prefixes at position 0, then two codes
    steps = [tokens, torch.tensor([[3], [5]]), torch.tensor([[7], [1]])]
    outs = []
    for dirty in (False, True):
        cache, logits = KVCache(), []
        for i, t in enumerate(steps):
            logits.append(prior.static_step(t, torch.tensor([i]), cache))
            if dirty and i == 0:
                for buf in cache.keys + cache.values:
                    buf[:, :, 1:] = 100.0 * torch.randn_like(buf[:, :, 1:])
        outs.append(torch.stack(logits))
    assert torch.equal(outs[0], outs[1])
    # and the eager growing cache agrees with the static step position by position
    cache = KVCache()
    eager = torch.stack([prior.step(t, cache).logits[:, -1] for t in steps])
    torch.testing.assert_close(outs[0], eager, atol=1e-4, rtol=1e-4)


def test_misuse_is_refused():
    prior = tiny()
    with pytest.raises(ValueError, match="needs use_cache"):
        SampleSettings(cuda_graph=True, use_cache=False)
    prefix = prior.prefix(LABELS, 4)
    with pytest.raises(ValueError, match="needs the prior on a GPU"):
        DecodeStep(prior, prefix, seeded_uniforms(SEEDS, L, prefix.device), SampleSettings(), False, graph=True)
    step = DecodeStep(prior, prefix, seeded_uniforms(SEEDS, 2, prefix.device), SampleSettings(), False)
    step(), step()
    with pytest.raises(RuntimeError, match="all 2 codes are drawn"):
        step()
    step.reset()
    step()  # a reset step decodes again


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_graph_replays_the_static_step(autocast):
    """On a GPU: the captured graph gives the eager static step's codes (same kernels, so the same numbers), under
    bf16 autocast too, and a second decode captures afresh."""
    prior = tiny().cuda()
    labels = LABELS.cuda()
    ctx = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    for kw in (dict(temperature=0.0, cfg_scale=3.0), dict(top_k=8, cfg_scale=1.5, cfg_schedule="linear")):
        settings = SampleSettings(cuda_graph=True, **kw)
        guided = True
        with ctx:
            prefix = torch.cat([prior.prefix(labels, 4), prior.prefix(None, 4)])
            uniforms = seeded_uniforms(SEEDS, L, prefix.device)
            graph = DecodeStep(prior, prefix, uniforms, settings, guided, keep_logits=True, graph=True)
            eager = DecodeStep(prior, prefix, uniforms, settings, guided, keep_logits=True, graph=False)
            for _ in range(L):
                graph(), eager()
            again = decode(prior, labels, L, settings, SEEDS)
        assert graph.graph is not None
        assert torch.equal(graph.codes, eager.codes) and torch.equal(again.codes, graph.codes)
        torch.testing.assert_close(graph.logits, eager.logits)
        if not autocast:
            assert torch.equal(decode(prior, labels, L, SampleSettings(**kw), SEEDS).codes, graph.codes)


def test_gpu_check_refuses_without_cuda_and_runs_every_part_on_the_cpu(capsys, monkeypatch):
    """scripts/gpu_check (python -m benchmarks.gpu_check): one line and exit status 2 without a CUDA device; the
    --device=cpu --tiny smoke run prints one table with every part's rows and no error."""
    from pathlib import Path

    from benchmarks import gpu_check

    script = Path(__file__).parents[1] / "scripts" / "gpu_check"
    assert script.stat().st_mode & 0o111 and "python -m benchmarks.gpu_check" in script.read_text()
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: False)
        assert gpu_check.main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("gpu_check: no CUDA device")

    assert gpu_check.main(["--device=cpu", "--tiny"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = lines.index("| part | setting | result | detail |")
    rows = [line for line in lines[start + 2:] if line]
    rows = rows[:-1]  # the closing "N s in all" line
    assert all(r.startswith("| ") and r.endswith(" |") for r in rows), out  # one table, nothing printed inside it
    parts = [r.split(" | ")[0].removeprefix("| ") for r in rows]
    assert parts == ["train step"] * 2 + ["encode_shards"] + ["sampling"] * 8 + ["sampling check", "quantizer"], out
    assert "error" not in out and "100.0% of codes equal" in out
    assert all(r.split(" | ")[2].split()[0].replace(",", "").replace(".", "").isdigit() for r in rows[:-2]), out
