"""A non-finite loss skips the step (no optimiser step, no EMA update, gradients zeroed, a warning naming the step and
the losses, `skipped/<name>` in the log), max_nonfinite_steps in a row stop the run with a clear error, and no
checkpoint is ever written with non-finite weights."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from data.errors import UserError
from pipelines.trainer import LoopConfig, Trainer


def make_trainer(tmp_path, **loop):
    torch.manual_seed(0)
    cfg = LoopConfig(**{"steps": 6, "log_every": 100, "eval_every": 100, "ckpt_every": 100, "keep_checkpoints": 10,
                        "ema_decay": 0.5, **loop})
    trainer = Trainer(cfg, tmp_path, kind="test", model_config={}, full_config={})
    model = torch.nn.Linear(3, 1)
    trainer.add("g", model, torch.optim.SGD(model.parameters(), lr=0.1), ema=True)
    return trainer, model


def run(trainer, model, nan_steps, snapshots=None):
    """fit() on random batches; the loss is NaN at the steps in `nan_steps`; `snapshots[step]`: raw and EMA weights
    after that step."""

    def batches(start):
        g = torch.Generator().manual_seed(start)
        while True:
            yield torch.randn(4, 3, generator=g)

    def train_step(micro, step):
        def losses(x):
            y = model(x)
            mse = y.pow(2).mean() * (float("nan") if step in nan_steps else 1.0)
            return {"mse": mse, "l1": y.abs().mean()}
        logs = trainer.step("g", micro, losses, {"mse": 1.0})
        if snapshots is not None:
            snapshots[step] = ({k: v.clone() for k, v in model.state_dict().items()},
                               {k: v.clone() for k, v in trainer.ema.module.state_dict().items()},
                               trainer.schedulers["g"].last_epoch)
        return logs

    return trainer.fit(batches, train_step)


def test_a_nan_step_is_skipped_and_the_run_goes_on(tmp_path):
    trainer, model = make_trainer(tmp_path)
    snaps = {}
    with pytest.warns(RuntimeWarning, match=r"step 2: non-finite g loss \(mse\); the step is skipped \(1 in a row"):
        run(trainer, model, nan_steps={2}, snapshots=snaps)
    raw1, ema1, sched1 = snaps[1]
    raw2, ema2, sched2 = snaps[2]
    assert all(torch.equal(raw1[k], raw2[k]) for k in raw1) and all(torch.equal(ema1[k], ema2[k]) for k in ema1)
    assert sched2 == sched1  # no optimiser step, so no scheduler step
    assert all(p.grad is None for p in model.parameters())  # the NaN gradients were never left behind
    raw3, ema3, _ = snaps[3]
    assert not torch.equal(raw3["weight"], raw2["weight"]) and not torch.equal(ema3["weight"], ema2["weight"])
    assert trainer.global_step == 6 and trainer.nonfinite_streak["g"] == 0  # reset by the next good step
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    skipped = [r for r in logs if "skipped/g" in r]
    assert [r["step"] for r in skipped] == [3]  # logged although log_every=100: the 3rd step (global step 2)
    assert math.isnan(skipped[0]["mse"]) and math.isfinite(skipped[0]["l1"])
    assert "lr/g" not in skipped[0]


def test_consecutive_nan_steps_stop_the_run_and_no_checkpoint_holds_them(tmp_path):
    trainer, model = make_trainer(tmp_path, ckpt_every=1, max_nonfinite_steps=3)
    with pytest.warns(RuntimeWarning, match="step 3"), pytest.warns(RuntimeWarning, match="step 4"):
        with pytest.raises(FloatingPointError, match=r"non-finite g loss at step 5: \{'mse': nan, 'l1': [0-9.]+\}; "
                                                     r"lower --loop.lr.*3 consecutive steps of 'g' were non-finite "
                                                     r"\(mse\), --loop.max_nonfinite_steps=3"):
            run(trainer, model, nan_steps={3, 4, 5})
    # checkpoints after steps 1..5; those after the skipped steps 3 and 4 hold step 2's weights; none after step 5
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == [f"step-{n:09d}" for n in range(1, 6)]
    for name in ckpts:
        for f in (tmp_path / "checkpoints" / name).glob("*.safetensors"):
            assert all(torch.isfinite(v).all() for v in load_file(str(f)).values()), (name, f.name)
    a, b = (load_file(str(tmp_path / "checkpoints" / f"step-{n:09d}" / "raw.safetensors")) for n in (3, 5))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_refuses_non_finite_weights(tmp_path):
    trainer, model = make_trainer(tmp_path)
    trainer.global_step = 1
    assert trainer.save().is_dir()
    with torch.no_grad():
        model.bias.fill_(float("inf"))
    trainer.ema.update(model)
    trainer.global_step = 2
    with pytest.raises(FloatingPointError, match=r"refusing to write the step-2 checkpoint.*model/bias, raw/bias"):
        trainer.save()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000000001"]  # not even a temp dir


def test_a_non_finite_gradient_under_clipping_is_skipped_too(tmp_path):
    """A finite loss with a NaN gradient (d sqrt|w| / dw at w = 0) would otherwise poison the weights."""
    trainer, model = make_trainer(tmp_path, grad_clip=1.0)
    with torch.no_grad():
        model.weight.zero_()
    before = model.weight.clone()
    with pytest.warns(RuntimeWarning, match=r"non-finite g loss \(grad_norm/g\)"):
        logs = trainer.step("g", [torch.randn(4, 3)], lambda x: {"root": model.weight.abs().sqrt().sum()},
                            {"root": 1.0})
    assert logs["skipped/g"] == 1.0 and math.isnan(logs["grad_norm/g"]) and math.isfinite(logs["root"])
    assert torch.equal(model.weight, before) and all(p.grad is None for p in model.parameters())


def test_settings_are_checked(tmp_path):
    trainer, model = make_trainer(tmp_path, grad_clip_by_model={"d": 10.0})
    with pytest.raises(UserError, match=r"grad_clip_by_model names \['d'\], not models of this stage \(\['g'\]\)"):
        run(trainer, model, nan_steps=set())
    trainer, model = make_trainer(tmp_path, max_nonfinite_steps=0)
    with pytest.raises(UserError, match="max_nonfinite_steps=0: it must be >= 1"):
        run(trainer, model, nan_steps=set())
