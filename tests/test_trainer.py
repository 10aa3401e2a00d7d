"""Trainer.step, the one optimisation protocol: accumulation, weighted named losses, the finiteness check, the other
models frozen, then the optimiser step."""
import copy

import pytest
import torch

from pipelines.trainer import LoopConfig, Trainer


def two_models(tmp_path, **loop):
    torch.manual_seed(0)
    trainer = Trainer(LoopConfig(ema_decay=0, **loop), tmp_path, kind="test", model_config={}, full_config={})
    a, b = torch.nn.Linear(3, 1), torch.nn.Linear(1, 1)
    trainer.add("a", a, torch.optim.SGD(a.parameters(), lr=0.1))
    trainer.add("b", b, torch.optim.SGD(b.parameters(), lr=0.1))
    return trainer, a, b


def losses(a, b, x):
    y = b(a(x))  # b sits in a's graph, like the discriminator in the generator's gan/g term
    return {"mse": y.pow(2).mean(), "l1": y.abs().mean(), "aux": y.detach().mean()}


def test_step_is_one_optimiser_step_on_the_mean_weighted_total(tmp_path):
    trainer, a, b = two_models(tmp_path, grad_clip=100.0)
    x = torch.randn(4, 3)
    ref_a, ref_b = copy.deepcopy(a), copy.deepcopy(b)
    logs = trainer.step("a", [x[:2], x[2:]], lambda batch: losses(a, b, batch), weights={"mse": 1.0, "l1": 0.5})

    terms = [losses(ref_a, ref_b, batch) for batch in (x[:2], x[2:])]
    total = sum(t["mse"] + 0.5 * t["l1"] for t in terms) / 2
    total.backward()
    with torch.no_grad():
        for p, ref in zip(a.parameters(), ref_a.parameters()):
            torch.testing.assert_close(p, ref - 0.1 * ref.grad)
    # every named loss is logged (weighted or not), averaged over the micro-batches, with lr and grad norm
    for k in ("mse", "l1", "aux"):
        assert logs[k] == pytest.approx(sum(float(t[k].detach()) for t in terms) / 2)
    assert logs["lr/a"] == pytest.approx(0.1) and "grad_norm/a" in logs
    # the other model only passed gradients through: none on its weights, and it trains again afterwards
    assert all(p.grad is None for p in b.parameters()) and all(p.requires_grad for p in b.parameters())
    assert torch.equal(b.weight, ref_b.weight)


def test_non_finite_loss_stops_before_the_update(tmp_path):
    trainer, a, b = two_models(tmp_path, max_nonfinite_steps=1)  # stop at the first (tests/test_nonfinite.py: skips)
    before = copy.deepcopy(a.state_dict())
    bad = lambda batch: {"mse": a(batch).sum() * float("nan")}  # noqa: E731
    with pytest.raises(FloatingPointError, match=r"non-finite a loss at step 0: \{'mse': nan\}; lower --loop.lr"):
        trainer.step("a", [torch.randn(2, 3)], bad, weights={"mse": 1.0})
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in before.items())


def test_a_weight_without_its_loss_is_an_error(tmp_path):
    trainer, a, b = two_models(tmp_path)
    with pytest.raises(KeyError, match="loss weights name"):
        trainer.step("a", [torch.randn(2, 3)], lambda batch: losses(a, b, batch), weights={"msee": 1.0})


def test_grad_clip_per_model_bounds_each_model_s_update(tmp_path):
    """grad_clip_by_model clips each model by its own norm (DAC: G 1000, D 10); a model it does not name uses
    grad_clip (0 = off): the negative control, whose update is its whole gradient."""
    trainer, a, b = two_models(tmp_path, grad_clip_by_model={"a": 0.01})
    x = 10 * torch.randn(4, 3)
    updates, norms = {}, {}
    for name, m, loss in (("a", a, lambda batch: {"l": a(batch).pow(2).mean()}),
                          ("b", b, lambda batch: {"l": b(a(batch).detach()).pow(2).mean()})):
        before = [p.detach().clone() for p in m.parameters()]
        logs = trainer.step(name, [x], loss, {"l": 1.0})
        updates[name] = torch.cat([(p0 - p.detach()).flatten() for p0, p in zip(before, m.parameters())]).norm() / 0.1
        norms[name] = logs.get(f"grad_norm/{name}")
    assert norms["a"] > 0.1 and updates["a"].item() == pytest.approx(0.01, rel=1e-4)  # clipped to 0.01
    assert norms["b"] is None and updates["b"].item() > 0.1  # not clipped: the step is the raw gradient (x lr)
