"""The tokenizer stage end to end on digits: training lowers the loss, resume is exact, reconstruct reads it back."""
import json

import pytest
import torch
from safetensors.torch import load_file

from pipelines import reconstruct, train_tokenizer
from pipelines.checkpoint import latest_checkpoint, load_tokenizer

TINY = ["--batch_size=16", "--model.size=tiny", "--model.num_codes=64", "--losses.disc_layers=2",
        '--losses.weights={"recon/l1": 1.0, "gan/g": 0.1, "vq/commit": 1.0}', "--loop.lr=1e-3"]


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_training_lowers_reconstruction_loss(digits_shards, tmp_path):
    run = tmp_path / "run"
    train_tokenizer.main(TINY + [f"--data={digits_shards}", f"--out={run}", "--loop.steps=30", "--loop.log_every=5",
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
    metrics = reconstruct.main([f"--tokenizer={run}", f"--data={digits_shards}", f"--out={tmp_path / 'recon'}"])
    assert metrics["val/samples"] == json.loads((digits_shards / "manifest.json").read_text())["counts"]["val"]
    assert (tmp_path / "recon" / "recon.png").is_file()


def test_resume_matches_uninterrupted_run(digits_shards, tmp_path):
    common = TINY + [f"--data={digits_shards}", "--loop.log_every=1", "--loop.eval_every=1000", "--loop.ckpt_every=3"]
    train_tokenizer.main(common + [f"--out={tmp_path / 'a'}", "--loop.steps=6"])
    train_tokenizer.main(common + [f"--out={tmp_path / 'b'}", "--loop.steps=3"])  # "interrupted" after step 3
    with pytest.raises(FileExistsError, match="resume"):
        train_tokenizer.main(common + [f"--out={tmp_path / 'b'}", "--loop.steps=6"])
    train_tokenizer.main(common + [f"--out={tmp_path / 'b'}", "--loop.steps=6", "--loop.resume=true"])
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
