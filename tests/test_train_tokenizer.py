"""The tokenizer stage end to end on digits: training lowers the loss, resume is exact, reconstruct reads it back."""
import json

import pytest
import torch
from safetensors.torch import load_file

from data.reader import media_loader
from pipelines import reconstruct, train_tokenizer
from pipelines.checkpoint import latest_checkpoint, load_checkpoint, load_tokenizer
from data.errors import UserError
from pipelines.config import from_dict, parse_config
from pipelines.trainer import EMA
from tokenizer import TokenizerConfig, build_tokenizer
from tokenizer.quantizers import build_quantizer

TINY = ["--batch_size=16", "--model.size=tiny", "--model.num_codes=64", "--losses.disc_layers=2",
        '--losses.weights={"recon/l1": 1.0, "gan/g": 0.1, "vq/commit": 1.0}', "--loop.lr=1e-3"]


def train(argv):
    return train_tokenizer.main(parse_config(train_tokenizer.TrainTokenizerConfig, argv))


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_training_lowers_reconstruction_loss(digits_shards, tmp_path):
    run = tmp_path / "run"
    train(TINY + [f"--data={digits_shards}", f"--out={run}", "--loop.steps=30", "--loop.log_every=5",
          "--loop.eval_every=30", "--loop.ckpt_every=30", "--eval_batches=2"])
    logs = [r for r in read_log(run) if "recon/l1" in r]
    first, last = logs[0]["recon/l1"], logs[-1]["recon/l1"]
    assert last < 0.8 * first, (first, last)
    assert all(k in logs[-1] for k in ("vq/commit", "gan/g", "gan/d", "train/utilisation", "train/perplexity"))
    val = [r for r in read_log(run) if "val/psnr" in r][-1]
    assert 0 < val["val/utilisation"] <= 1 and val["val/psnr"] > 5
    assert (run / "recon-0000030.png").is_file()
    # the exported model rebuilds from its checkpoint alone, and reconstruct reports over the whole val split
    model, ckpt = load_tokenizer(run)
    assert ckpt == latest_checkpoint(run)
    metrics = reconstruct.main(reconstruct.ReconstructConfig(tokenizer=str(run), data=str(digits_shards),
                                                             out=str(tmp_path / "recon")))
    assert metrics["val/samples"] == json.loads((digits_shards / "manifest.json").read_text())["counts"]["val"]
    assert (tmp_path / "recon" / "recon.png").is_file()


def test_resume_matches_uninterrupted_run(digits_shards, tmp_path):
    common = TINY + [f"--data={digits_shards}", "--loop.log_every=1", "--loop.eval_every=1000", "--loop.ckpt_every=3"]
    train(common + [f"--out={tmp_path / 'a'}", "--loop.steps=6"])
    train(common + [f"--out={tmp_path / 'b'}", "--loop.steps=3"])  # "interrupted" after step 3
    with pytest.raises(UserError, match="already holds checkpoints: pass --loop.resume=true"):
        train(common + [f"--out={tmp_path / 'b'}", "--loop.steps=6"])
    train(common + [f"--out={tmp_path / 'b'}", "--loop.steps=6", "--loop.resume=true"])
    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    assert a.name == b.name == "step-000000006"
    for name in ("model", "raw", "d"):
        wa, wb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=1e-5), (name, k)
    la = [r["recon/l1"] for r in read_log(tmp_path / "a") if "recon/l1" in r]
    lb = [r["recon/l1"] for r in read_log(tmp_path / "b") if "recon/l1" in r]
    assert la == pytest.approx(lb, rel=1e-5)  # the same loss curve


def test_two_processes_train_on_the_same_code_path(digits_shards, tmp_path):
    """`torchrun`/`accelerate launch` with 2 CPU processes (gloo): one run, one checkpoint, val reduced over ranks."""
    import os
    import subprocess
    import sys
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "pipelines.train_tokenizer",
           *TINY, f"--data={digits_shards}", f"--out={run}", "--loop.steps=2", "--loop.log_every=1",
           "--loop.eval_every=2", "--loop.ckpt_every=2", "--batch_size=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [c.name for c in (run / "checkpoints").iterdir()] == ["step-000000002"]
    logs = read_log(run)
    assert [r["step"] for r in logs if "recon/l1" in r] == [1, 2]  # the main process logs, once per step
    val = [r for r in logs if "val/samples" in r][-1]
    assert val["val/samples"] == json.loads((digits_shards / "manifest.json").read_text())["counts"]["val"]


def test_ema_averages_changing_buffers_and_leaves_the_frozen_codebook_alone():
    """EMA-VQ's codebook statistics are averaged like parameters and its embedding recomputed from them; SimVQ's
    frozen codebook is neither averaged nor copied; integer counters are copied."""
    torch.manual_seed(0)
    net = torch.nn.ModuleDict({"ema_vq": build_quantizer("ema-vq", dim=4, num_codes=8, decay=0.5),
                               "simvq": build_quantizer("simvq", dim=4, num_codes=8),
                               "bn": torch.nn.BatchNorm1d(4)})
    ema = EMA(net, decay=0.5)
    expected = {k: v.clone() for k, v in ema.module.state_dict().items()}
    frozen = ema.module["simvq"].frozen_codebook
    frozen_version = frozen._version
    for n in range(1, 5):
        z = torch.randn(2, 4, 16) + n
        net["ema_vq"](z), net["bn"](z)
        with torch.no_grad():
            net["simvq"].proj.weight.add_(0.1)
        ema.update(net)
        d = min(0.5, (1 + n) / (10 + n))
        for k, v in net.state_dict().items():
            if v.is_floating_point() and k not in ("ema_vq.embedding", "simvq.frozen_codebook"):
                expected[k] = torch.lerp(expected[k], v, 1 - d)
            elif not v.is_floating_point():
                expected[k] = v.clone()
        q = net["ema_vq"]
        size, avg = expected["ema_vq.cluster_size"], expected["ema_vq.embed_avg"]
        smoothed = (size + q.eps) / (size.sum() + q.num_codes * q.eps) * size.sum()
        expected["ema_vq.embedding"] = avg / smoothed[:, None]
    got = ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, msg=k)
    assert not torch.allclose(got["ema_vq.cluster_size"], net["ema_vq"].cluster_size)  # averaged, not copied
    assert got["bn.num_batches_tracked"] == 4
    # the frozen codebook was never written: same tensor, same version counter, same values as the raw model's
    assert ema.module["simvq"].frozen_codebook is frozen and frozen._version == frozen_version
    assert torch.equal(frozen, net["simvq"].frozen_codebook)


def test_exported_ema_vq_reconstructs_at_least_as_well_as_raw(digits_shards, tmp_path):
    """The exported (EMA) EMA-VQ tokenizer averages its codebook over the same steps as its encoder and decoder."""
    run = tmp_path / "run"
    train(["--batch_size=16", "--model.size=tiny", "--model.num_codes=64", "--model.quantizer=ema-vq",
          '--losses.weights={"recon/l1": 1.0, "vq/commit": 1.0}', "--loop.lr=1e-3",
          f"--data={digits_shards}", f"--out={run}", "--loop.steps=40", "--loop.log_every=40",
          "--loop.eval_every=1000", "--eval_batches=1"])
    config, weights = load_checkpoint(latest_checkpoint(run), names=("model", "raw"))
    models = {}
    for name in ("model", "raw"):
        models[name] = build_tokenizer(from_dict(TokenizerConfig, config["config"])).eval()
        models[name].load_state_dict(weights[name])
    q_ema, q_raw = models["model"].quantizer, models["raw"].quantizer
    assert not torch.allclose(q_ema.cluster_size, q_raw.cluster_size)  # the raw, latest statistics are not exported
    n = q_ema.cluster_size.sum()
    smoothed = (q_ema.cluster_size + q_ema.eps) / (n + q_ema.num_codes * q_ema.eps) * n
    torch.testing.assert_close(q_ema.embedding, q_ema.embed_avg / smoothed[:, None])
    errors = {name: 0.0 for name in models}
    with torch.no_grad():
        for batch in media_loader(str(digits_shards), "val", 64, train=False):
            for name, model in models.items():
                errors[name] += float((model(batch.x).x_hat.clamp(-1, 1) - batch.x).abs().sum())
    assert errors["model"] <= errors["raw"], errors


def test_fp16_loss_scaler_state_survives_resume(tmp_path):
    """fp16 needs CUDA, so the GradScaler accelerate would create is put where accelerate keeps it
    (accelerator.scaler); save() and resume() must carry its scale and growth counter."""
    from pipelines.trainer import LoopConfig, Trainer

    def trainer_with_scaler(resume: bool):
        torch.manual_seed(0)
        trainer = Trainer(LoopConfig(steps=1, resume=resume, ema_decay=0), tmp_path, kind="test", model_config={},
                          full_config={})
        model = torch.nn.Linear(2, 2)
        trainer.add("g", model, torch.optim.SGD(model.parameters(), lr=0.1))
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
        return trainer

    trainer = trainer_with_scaler(resume=False)
    scaler, w = trainer.accelerator.scaler, torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    for factor in (float("inf"), 1.0):  # an overflow halves the scale, then a good step counts towards growth
        opt.zero_grad()
        scaler.scale(w.sum() * factor).backward()
        scaler.step(opt)
        scaler.update()
    saved = scaler.state_dict()
    assert saved["scale"] == 512.0 and saved["_growth_tracker"] == 1
    trainer.global_step = 1
    trainer.save()

    resumed = trainer_with_scaler(resume=True)
    assert resumed.accelerator.scaler.state_dict()["scale"] == 1024.0  # a fresh scaler, before resume
    assert resumed.resume()
    assert resumed.accelerator.scaler.state_dict() == saved


def test_generator_step_leaves_no_gradient_on_the_discriminator(digits_shards, tmp_path, monkeypatch):
    """D is in the generator's graph (gan/g); its weights must get nothing from G's backward, which under DDP was
    also all-reduced on every generator micro-step."""
    from pipelines.trainer import Trainer
    seen = []
    original = Trainer._optimizer_step

    def spy(self, name):
        if name == "g":
            seen.append([p.grad for p in self.unwrap("d").parameters()])
        return original(self, name)

    monkeypatch.setattr(Trainer, "_optimizer_step", spy)
    train(TINY + [f"--data={digits_shards}", f"--out={tmp_path / 'run'}", "--loop.steps=2",
          "--loop.grad_accum=2", "--batch_size=4", "--loop.log_every=1",
          "--loop.eval_every=1000"])
    assert len(seen) == 2 and all(g is None for grads in seen for g in grads)


def test_frozen_discriminator_is_not_all_reduced_under_ddp(tmp_path):
    """A one-process gloo group is enough for DDP's reducer: count its all-reduces with a comm hook."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pipelines.trainer import frozen

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        d = DDP(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LeakyReLU(), torch.nn.Conv2d(4, 1, 3)))
        calls = []

        def count(state, bucket):
            calls.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        d.register_comm_hook(None, count)
        x_hat = torch.randn(2, 3, 8, 8, requires_grad=True)
        (-d(x_hat).mean()).backward()  # negative control: a plain generator-side backward through D is all-reduced
        assert calls
        calls.clear(), d.zero_grad(set_to_none=True)
        x_hat.grad = None
        for _ in range(2):  # two generator micro-steps
            with frozen(d):
                (-d(x_hat).mean()).backward()
        assert calls == [] and all(p.grad is None for p in d.parameters())
        assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0  # the generator still gets its gradient
        assert all(p.requires_grad for p in d.parameters())
        d(x_hat.detach()).mean().backward()  # the discriminator's own step: synced as usual
        assert calls and all(p.grad is not None for p in d.parameters())
    finally:
        dist.destroy_process_group()
