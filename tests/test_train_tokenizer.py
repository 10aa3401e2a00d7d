"""The tokenizer stage end to end on digits: training lowers the loss, resume is exact, reconstruct reads it back;
several discriminators train as one model "d", under DDP too."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data.reader import media_loader
from pipelines import reconstruct, train_tokenizer
from pipelines.checkpoint import latest_checkpoint, load_checkpoint, load_state, load_tokenizer
from data.errors import UserError
from pipelines.config import from_dict, parse_config
from pipelines.trainer import EMA, Trainer
from tokenizer import TokenizerConfig, TokenizerLosses, build_tokenizer
from tokenizer.losses import DISCRIMINATORS, Discriminators, hinge_d_loss, non_saturating_g_loss
from tokenizer.quantizers import build_quantizer

from test_losses import TwoScales

TINY = ["--batch_size=16", "--model.size=tiny", "--model.num_codes=64", "--losses.disc_layers=2",
        '--losses.weights={"recon/l1": 1.0, "gan/g": 0.1, "vq/commit": 1.0}', "--loop.lr=1e-3"]


def two_scales(cfg, in_channels: int, dims: int) -> TwoScales:
    """A second discriminator kind, with two outputs (as MPD/MRD), for the registry."""
    return TwoScales(in_channels)


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
    # c: the same checkpoint as written before the dict of discriminators (the one PatchGAN's keys, no "patch.")
    shutil.copytree(tmp_path / "b", tmp_path / "c")
    d_file = str(latest_checkpoint(tmp_path / "c") / "d.safetensors")
    save_file({k.removeprefix("patch."): v for k, v in load_file(d_file).items()}, d_file)
    with pytest.raises(UserError, match="already holds checkpoints: pass --loop.resume=true"):
        train(common + [f"--out={tmp_path / 'b'}", "--loop.steps=6"])
    for run in ("b", "c"):
        train(common + [f"--out={tmp_path / run}", "--loop.steps=6", "--loop.resume=true"])
    a = latest_checkpoint(tmp_path / "a")
    assert list(load_file(str(a / "d.safetensors")))[0].startswith("patch.")
    la = [r["recon/l1"] for r in read_log(tmp_path / "a") if "recon/l1" in r]
    for run in ("b", "c"):
        b = latest_checkpoint(tmp_path / run)
        assert a.name == b.name == "step-000000006"
        for name in ("model", "raw", "d"):
            wa, wb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
            assert wa.keys() == wb.keys()
            for k in wa:
                assert torch.allclose(wa[k], wb[k], atol=1e-6, rtol=1e-5), (run, name, k)
        lb = [r["recon/l1"] for r in read_log(tmp_path / run) if "recon/l1" in r]
        assert la == pytest.approx(lb, rel=1e-5)  # the same loss curve


DDP_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from test_train_tokenizer import two_scales
from pipelines import train_tokenizer
from pipelines.cli import run
from pipelines.trainer import Trainer
from tokenizer.losses import DISCRIMINATORS

DISCRIMINATORS["two-scales"] = two_scales
fit = Trainer.fit

def fit_and_save_parameters(self, *args, **kwargs):  # every process's final parameters, compared across ranks
    out = fit(self, *args, **kwargs)
    params = {{f"{{n}}/{{k}}": p.detach() for n in self.models for k, p in self.unwrap(n).named_parameters()}}
    torch.save(params, self.run_dir / f"params-rank{{self.accelerator.process_index}}.pt")
    return out

Trainer.fit = fit_and_save_parameters
run(train_tokenizer.main, train_tokenizer.TrainTokenizerConfig)
"""


def test_two_processes_train_on_the_same_code_path(digits_shards, tmp_path):
    """`torchrun`/`accelerate launch` with 2 CPU processes (gloo): one run, one checkpoint, val reduced over ranks;
    with two discriminators the generator and every discriminator end with the same parameters on both processes
    (a discriminator called outside the DDP wrapper would not have its gradients all-reduced)."""
    import os
    import subprocess
    import sys
    run, script = tmp_path / "ddp", tmp_path / "train_with_two_scales.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script),
           *TINY, f"--data={digits_shards}", f"--out={run}", "--loop.steps=2", "--loop.log_every=1",
           "--loop.eval_every=2", "--loop.ckpt_every=2", "--batch_size=8", "--losses.discriminators=patch,two-scales"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [c.name for c in (run / "checkpoints").iterdir()] == ["step-000000002"]
    logs = read_log(run)
    assert [r["step"] for r in logs if "recon/l1" in r] == [1, 2]  # the main process logs, once per step
    assert all("gan/d" in r for r in logs if "recon/l1" in r)
    val = [r for r in logs if "val/samples" in r][-1]
    assert val["val/samples"] == json.loads((digits_shards / "manifest.json").read_text())["counts"]["val"]
    ranks = [torch.load(run / f"params-rank{i}.pt", weights_only=True) for i in (0, 1)]
    assert {k.split(".")[0] for k in ranks[0] if k.startswith("d/")} == {"d/patch", "d/two-scales"}
    assert [k for k in ranks[0] if not torch.equal(ranks[0][k], ranks[1][k])] == []  # none out of sync


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


@pytest.mark.parametrize("kinds", ["patch", "patch,two-scales"])
def test_discriminators_train_as_one_model(digits_shards, tmp_path, monkeypatch, kinds):
    """Every discriminator is in the one model "d": the generator's step leaves no gradient on any of them (they sit in
    its graph through gan/g; under DDP that was also all-reduced every generator micro-step), the D step trains them
    all, and gan/g and gan/d are the sums over every discriminator's logits from one call of them all per input."""
    monkeypatch.setitem(DISCRIMINATORS, "two-scales", two_scales)
    grads, outs, sums = {"g": [], "d": []}, [], []
    optimizer_step, forward = Trainer._optimizer_step, Discriminators.forward
    g_losses, d_losses = TokenizerLosses.generator_losses, TokenizerLosses.discriminator_losses

    def spy_step(self, name):
        grads[name].append({k: p.grad for k, p in self.unwrap("d").named_parameters()})
        return optimizer_step(self, name)

    def spy_forward(self, x):
        outs.append(forward(self, x))
        return outs[-1]

    def spy_g(self, *args):
        outs.clear()
        got = g_losses(self, *args)
        (fake,) = outs  # one call for all of them
        sums.append((got["gan/g"], sum(non_saturating_g_loss(f) for name in fake for f in fake[name])))
        return got

    def spy_d(self, *args):
        outs.clear()
        got = d_losses(self, *args)
        real, fake = outs  # one call on x, one on x_hat
        sums.append((got["gan/d"], sum(hinge_d_loss(r, f) for name in real for r, f in zip(real[name], fake[name]))))
        return got

    monkeypatch.setattr(Trainer, "_optimizer_step", spy_step)
    monkeypatch.setattr(Discriminators, "forward", spy_forward)
    monkeypatch.setattr(TokenizerLosses, "generator_losses", spy_g)
    monkeypatch.setattr(TokenizerLosses, "discriminator_losses", spy_d)
    train(TINY + [f"--data={digits_shards}", f"--out={tmp_path / 'run'}", "--loop.steps=2", "--loop.grad_accum=2",
                  "--batch_size=4", "--loop.log_every=1", "--loop.eval_every=1000", f"--losses.discriminators={kinds}"])
    assert {k.split(".")[0] for k in grads["d"][0]} == set(kinds.split(","))
    assert len(grads["g"]) == 2 and all(g is None for step in grads["g"] for g in step.values())
    assert len(grads["d"]) == 2 and all(g is not None for step in grads["d"] for g in step.values())
    for name in kinds.split(","):  # (a last conv's bias gets exactly 0 from the hinge while every |logit| < 1)
        assert all(sum(g.abs().sum() for k, g in step.items() if k.startswith(f"{name}.")) > 0 for step in grads["d"])
    assert len(sums) == 8  # 2 steps x 2 micro-batches x (G, D)
    for got, expected in sums:
        torch.testing.assert_close(got, expected)


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



def test_shuffle_buffer_reaches_the_reader(monkeypatch, tmp_path, digits_shards):
    """Issue 8 item 1: the train reader's shuffle buffer is a setting."""
    from pipelines.config import parse_config

    class Seen(Exception):
        pass

    def loader(*args, **kwargs):
        raise Seen(kwargs.get("shuffle_buffer"))

    monkeypatch.setattr(train_tokenizer, "media_loader", loader)
    cfg = parse_config(train_tokenizer.TrainTokenizerConfig, [f"--data={digits_shards}", f"--out={tmp_path}",
                                                               "--shuffle_buffer=37", "--loop.steps=1",
                                                               '--losses.weights={"recon/l1": 1}'])
    with pytest.raises(Seen) as e:
        train_tokenizer.main(cfg)
    assert e.value.args == (37,)


@pytest.fixture(scope="module")
def tone_shards(tmp_path_factory):
    """16 kHz mono tones, 0.512 s clips (8,192 samples: a multiple of the audio-s hop 64)."""
    from helpers import write_tones
    from pipelines import make_shards
    root = tmp_path_factory.mktemp("tones")
    write_tones(root / "wavs", per_class=6, rate=16_000)
    make_shards.main(parse_config(make_shards.MakeShardsConfig, [
        f"--source={root / 'wavs'}", f"--out={root / 'shards'}", "--modality=audio", "--sample_rate=16000",
        "--clip_seconds=0.512", "--val_fraction=0.25"]))
    return root / "shards"


AUDIO = ["--model.arch=conv", "--model.size=audio-s", "--model.dims=1", "--model.in_channels=1",
         "--model.num_codes=64", "--batch_size=4", "--sample_rate=16000",
         '--losses.weights={"recon/mel": 45.0, "vq/commit": 1000.0, "gan/g": 1.0, "gan/fm": 1.0}',
         "--losses.discriminators=mpd,mrd", "--losses.mpd_width=0.0625", "--losses.mrd_width=0.0625",
         "--loop.warmup_steps=2", '--loop.grad_clip_by_model={"g": 1000, "d": 10}']


def test_tiny_audio_recipe_trains_with_a_mel_only_warm_start(tone_shards, tmp_path):
    """The audio recipe at tiny widths: steps before disc_start are recon/mel + vq/commit only (no gan/* term, no D
    step), after it every named loss is there and finite, and the checkpoint loads and reconstructs."""
    run = tmp_path / "run"
    train(AUDIO + [f"--data={tone_shards}", f"--out={run}", "--disc_start=2", "--loop.steps=4", "--loop.log_every=1",
                   "--loop.eval_every=4", "--loop.ckpt_every=4", "--eval_batches=1"])
    logs = [r for r in read_log(run) if "recon/mel" in r]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    for r in logs[:2]:
        assert not any(k.startswith("gan/") or k.endswith("/d") for k in r), r
    gan_keys = {"gan/g", "gan/g/mpd", "gan/g/mrd", "gan/fm", "gan/fm/mpd", "gan/fm/mrd", "gan/d", "gan/d/mpd",
                "gan/d/mrd", "grad_norm/g", "grad_norm/d", "lr/d"}
    for r in logs[2:]:
        assert gan_keys <= set(r), sorted(gan_keys - set(r))
    schedulers = load_state(latest_checkpoint(run))["schedulers"]  # D's warm-up counts its own steps, from disc_start
    assert (schedulers["g"]["last_epoch"], schedulers["d"]["last_epoch"]) == (4, 2)
    assert all(math.isfinite(v) for r in logs for v in r.values())
    model, ckpt = load_tokenizer(run)
    assert ckpt.name == "step-000000004"
    assert {k.split(".")[0] for k in load_file(str(ckpt / "d.safetensors"))} == {"mpd", "mrd"}
    batch = next(iter(media_loader(str(tone_shards), "val", 2, train=False)))
    with torch.no_grad():
        assert torch.isfinite(model(batch.x).x_hat).all()


def test_a_recipe_refuses_shards_at_another_rate(tone_shards, tmp_path):
    from pipelines.config import ConfigError
    with pytest.raises(ConfigError, match=r"--sample_rate=24000 but .* holds 16000 Hz audio"):
        train(AUDIO + [f"--data={tone_shards}", f"--out={tmp_path}", "--sample_rate=24000"])


@pytest.mark.parametrize("recipe, rate, size", [("paper", 24_000, "paper"), ("cpu", 16_000, "cpu")])
def test_the_audio_recipes_parse_and_name_what_exists(recipe, rate, size):
    """configs/tokenizer_audio_*.toml: every key is a setting, every registry name exists, the paper's numbers."""
    path = Path(__file__).parents[1] / "configs" / f"tokenizer_audio_{recipe}.toml"
    cfg = parse_config(train_tokenizer.TrainTokenizerConfig, [f"--config={path}", "--data=x", "--out=y"])
    train_tokenizer.check_names(cfg.model)
    assert (cfg.sample_rate, cfg.model.arch, cfg.model.size, cfg.model.dims) == (rate, "seanet-vocos", size, 1)
    assert {k: cfg.losses.weights[k] for k in ("recon/mel", "vq/commit")} == {"recon/mel": 45.0, "vq/commit": 1000.0}
    assert cfg.betas == (0.5, 0.9) and cfg.loop.lr == 1e-4 and cfg.loop.ema_decay == 0.999
    assert set(cfg.losses.discriminators) >= {"mpd", "mrd"}
    assert ("dac" in cfg.losses.discriminators) == (recipe == "paper")
    assert cfg.losses.mpd_width == (1.0 if recipe == "paper" else 0.25)
