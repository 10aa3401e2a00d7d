"""A stage killed with SIGKILL (no cleanup, no `finally`) and run again ends exactly where an uninterrupted run ends.

Each test runs the real command (`python -m pipelines.<stage>`) in a child process with one patch, made by LAUNCHER:
at a chosen point (inside a checkpoint write, between a step's backward and its optimiser update, inside a token
shard) the child prints a marker and sleeps, and the test SIGKILLs it there, so the kill lands at the same point on
every run. Then the stage is rerun and compared with an uninterrupted run of the same settings:

- train_tokenizer / train_prior: every log.jsonl line of the killed + resumed run (the lines the killed run wrote
  after its last checkpoint appear twice) equals the uninterrupted run's line of that step, and the final weights are
  byte-identical;
- encode_shards: the same token shards and manifest, byte for byte;
- checkpoint.py: a save killed half-way leaves the previous checkpoint loadable and `latest_checkpoint` ignores the
  half-written one; the next save of that name removes the killed writer's temp directory.
"""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.builtin import open_source
from data.errors import UserError
from data.files import TEMP_MARK
from data.media import MediaSpec
from data.shards import list_shards, write_media_shards
from data.tokens import load_tokens
from pipelines import train_tokenizer
from pipelines.checkpoint import (latest_checkpoint, load_checkpoint, load_state, resolve_checkpoint,
                                  save_checkpoint)
from pipelines.config import parse_config, to_dict
from tokenizer import TokenizerConfig, build_tokenizer

from helpers import python_m
from test_train_prior import write_tokens

ROOT = Path(__file__).resolve().parents[1]
MARKER = "KILL-ME-NOW"

# The child: `python -c LAUNCHER <module> <args...>`. `patch` (Python source) defines where block() is called.
LAUNCHER = """
import runpy, sys, time

def block():
    print({marker!r}, flush=True)
    time.sleep(600)  # the test kills the process here

{patch}
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def run_until_killed(tmp_path, patch: str, module: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Start `python -m module argv` with `patch` applied, wait for the marker, SIGKILL it."""
    code = LAUNCHER.format(marker=MARKER, patch=patch)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with open(tmp_path / "child.err", "w") as err:  # a file, not a pipe: tqdm must never block on a full pipe
        proc = subprocess.Popen([sys.executable, "-c", code, module, *argv], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            for line in proc.stdout:
                if line.strip() == MARKER:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        finally:
            proc.kill()  # a no-op after the SIGKILL; stops a child that never reached the marker
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "child.err").read_text()[-3000:]
    return proc


def read_log(run_dir: Path) -> list[dict]:
    """log.jsonl records without their timing (steps/s differs between runs)."""
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in records]


def assert_same_curve(reference: Path, interrupted: Path, redone_steps: set[int]) -> None:
    """Every record of the interrupted run (killed part + resumed part) equals the reference's record of that step and
    kind, every reference record is there, and the steps between the last checkpoint and the kill appear twice."""
    ref = {(r["step"], tuple(sorted(r))): r for r in read_log(reference)}
    got = read_log(interrupted)
    for r in got:
        assert r == ref[(r["step"], tuple(sorted(r)))], r["step"]  # bit-equal floats: json writes repr
    assert {(r["step"], tuple(sorted(r))) for r in got} == set(ref)
    steps = [r["step"] for r in got if not any(k.startswith("val/") for k in r)]
    assert {s for s in steps if steps.count(s) == 2} == redone_steps


def assert_same_files(a: Path, b: Path, names) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def temps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if TEMP_MARK in p.name)


# ------------------------------------------------------------------------------------------------ tokenizer
TOKENIZER = ["--batch_size=16", "--model.size=tiny", "--model.num_codes=64", "--losses.disc_layers=2",
             '--losses.weights={"recon/l1": 1.0, "gan/g": 0.1, "vq/commit": 1.0}', "--loop.lr=1e-3",
             "--loop.log_every=1", "--loop.eval_every=1000", "--eval_batches=1", "--loop.ckpt_every=2",
             "--loop.steps=6"]
BLOCK_IN_SAVE = """
import pipelines.checkpoint as checkpoint
real_save_file = checkpoint.save_file

def save_file(tensors, filename, *args, **kwargs):  # the step-4 checkpoint dies after its first weights file
    real_save_file(tensors, filename, *args, **kwargs)
    if ".step-000000004.tmp-" in filename:
        block()

checkpoint.save_file = save_file
"""


def test_train_tokenizer_killed_inside_a_checkpoint_write_resumes_on_the_same_curve(digits_shards, tmp_path):
    common = TOKENIZER + [f"--data={digits_shards}"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    python_m("pipelines.train_tokenizer", *common, f"--out={reference}")

    run_until_killed(tmp_path, BLOCK_IN_SAVE, "pipelines.train_tokenizer", common + [f"--out={killed}"])
    checkpoints = killed / "checkpoints"
    half = [name for name in temps(checkpoints) if name.startswith(".step-000000004")]
    assert half and not (checkpoints / half[0] / "config.json").exists()  # killed inside the write
    assert latest_checkpoint(killed) == checkpoints / "step-000000002"  # the half-written one is not a checkpoint
    with pytest.raises(UserError, match="already holds checkpoints: pass --loop.resume=true"):
        train_tokenizer.main(parse_config(train_tokenizer.TrainTokenizerConfig, common + [f"--out={killed}"]))

    python_m("pipelines.train_tokenizer", *common, f"--out={killed}", "--resume")
    assert_same_curve(reference, killed, redone_steps={3, 4})
    final = "checkpoints/step-000000006"
    assert_same_files(reference / final, killed / final, ["model.safetensors", "raw.safetensors", "d.safetensors"])
    assert temps(checkpoints) == []  # the resumed run's step-4 save removed the killed writer's temp directory


# ---------------------------------------------------------------------------------------------------- prior
PRIOR = ["--batch_size=16", "--model.size=tiny", "--loop.warmup_steps=2", "--loop.ema_decay=0.9",
         "--loop.log_every=1", "--loop.eval_every=4", "--eval_batches=1", "--loop.ckpt_every=2", "--loop.steps=6"]
BLOCK_BEFORE_UPDATE = """
import pipelines.trainer as trainer
real_optimizer_step = trainer.Trainer._optimizer_step

def optimizer_step(self, name):  # step 6 dies after its backward, before the optimiser update
    if self.global_step == 5:
        block()
    return real_optimizer_step(self, name)

trainer.Trainer._optimizer_step = optimizer_step
"""


def test_train_prior_killed_mid_step_resumes_on_the_same_curve(tmp_path):
    (tmp_path / "tokens").mkdir()
    tokens = write_tokens(tmp_path / "tokens", n_train=96, n_val=16)
    common = PRIOR + [f"--tokens={tokens}"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    python_m("pipelines.train_prior", *common, f"--out={reference}")

    run_until_killed(tmp_path, BLOCK_BEFORE_UPDATE, "pipelines.train_prior", common + [f"--out={killed}"])
    assert latest_checkpoint(killed).name == "step-000000004"
    assert max(r["step"] for r in read_log(killed)) == 5  # the killed run got past its last checkpoint

    python_m("pipelines.train_prior", *common, f"--out={killed}", "--resume")
    assert_same_curve(reference, killed, redone_steps={5})
    final = "checkpoints/step-000000006"
    assert_same_files(reference / final, killed / final, ["model.safetensors", "raw.safetensors"])


# ------------------------------------------------------------------------------------------------ encode
BLOCK_IN_SHARD = """
import data.shards
real_add = data.shards.AtomicTar.add
written = []

def add(self, key, fields):  # the third token shard dies after two of its samples
    real_add(self, key, fields)
    written.append(self.path.name)
    if len(set(written)) == 3 and self.count == 2:
        block()

data.shards.AtomicTar.add = add
"""


def test_encode_shards_killed_inside_a_shard_reruns_to_the_same_bytes(tmp_path):
    source = open_source("digits", "image", 16, 0, 0, "auto")
    media = tmp_path / "media"
    write_media_shards(source._replace(items=source.items[:40]), media, MediaSpec(modality="image", size=16),
                       val_fraction=0.25, max_count=4, log=lambda *a: None)
    torch.manual_seed(0)
    tok_cfg = TokenizerConfig(size="tiny", num_codes=64)
    save_checkpoint(tmp_path / "tok", config={"kind": "tokenizer", "config": to_dict(tok_cfg)},
                    weights={"model": build_tokenizer(tok_cfg).state_dict()})
    common = [f"--data={media}", f"--tokenizer={tmp_path / 'tok'}", "--device=cpu", "--batch_size=4"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    python_m("pipelines.encode_shards", *common, f"--out={reference}")

    run_until_killed(tmp_path, BLOCK_IN_SHARD, "pipelines.encode_shards", common + [f"--out={killed}"])
    assert len(list_shards(killed, "train")) == 2 and len(temps(killed)) == 1  # killed inside the third shard
    assert not (killed / "manifest.json").exists()
    with pytest.raises(UserError, match="manifest.json not found"):  # no stage reads an unfinished encode
        load_tokens(killed, "train")
    finished = {p.name: p.stat().st_ino for p in list_shards(killed, "train")}

    python_m("pipelines.encode_shards", *common, f"--out={killed}")
    names = sorted(p.name for split in ("train", "val") for p in list_shards(reference, split))
    assert sorted(p.name for p in killed.glob("*.tar")) == names and len(names) >= 8  # and no temp file
    assert_same_files(reference, killed, names + ["manifest.json"])
    assert {n: (killed / n).stat().st_ino for n in finished} == finished  # finished shards were not redone
    assert temps(killed) == []


# -------------------------------------------------------------------------------------------- checkpoint.py
SAVE_TWO = """
import torch
from pipelines.checkpoint import save_checkpoint
run = {run!r}
save_checkpoint(run + "/checkpoints/step-000000001", config={{"kind": "test", "step": 1}},
                weights={{"model": {{"w": torch.ones(3)}}}}, state={{"step": 1}})
save_checkpoint(run + "/checkpoints/step-000000002", config={{"kind": "test", "step": 2}},
                weights={{"model": {{"w": torch.zeros(3)}}, "raw": {{"w": torch.zeros(3)}}}}, state={{"step": 2}})
"""
BLOCK_SECOND_SAVE = BLOCK_IN_SAVE.replace("step-000000004", "step-000000002")


def test_a_save_killed_half_way_leaves_the_previous_checkpoint(tmp_path):
    script = tmp_path / "save_two.py"
    script.write_text(SAVE_TWO.format(run=str(tmp_path / "run")))
    code = LAUNCHER.format(marker=MARKER, patch=BLOCK_SECOND_SAVE).replace(
        "runpy.run_module(sys.argv[0], run_name=\"__main__\", alter_sys=True)",
        "runpy.run_path(sys.argv[0], run_name=\"__main__\")")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(script)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == MARKER
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    checkpoints = tmp_path / "run" / "checkpoints"
    [half] = temps(checkpoints)  # the killed writer's temp directory: model.safetensors, no config.json
    assert half == f".step-000000002{TEMP_MARK}{proc.pid}" and not (checkpoints / half / "config.json").exists()
    assert [p.name for p in checkpoints.iterdir() if not p.name.startswith(".")] == ["step-000000001"]
    assert latest_checkpoint(tmp_path / "run").name == resolve_checkpoint(tmp_path / "run").name == "step-000000001"
    config, weights = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert config["step"] == 1 and weights["model"]["w"].tolist() == [1.0, 1.0, 1.0]
    assert load_state(latest_checkpoint(tmp_path / "run")) == {"step": 1}

    # a directory a killed pruning half-deleted (config.json left, weights gone) is not taken for the newest either
    (checkpoints / "step-000000003").mkdir()
    (checkpoints / "step-000000003" / "config.json").write_text('{"kind": "test", "step": 3}')
    assert latest_checkpoint(tmp_path / "run").name == "step-000000001"

    live = checkpoints / f".step-000000002{TEMP_MARK}{os.getppid()}"  # a writer that is still running: kept
    live.mkdir()
    save_checkpoint(checkpoints / "step-000000002", config={"kind": "test", "step": 2},
                    weights={"model": {"w": torch.zeros(3)}}, state={"step": 2})
    assert temps(checkpoints) == [live.name]  # the dead writer's temp directory is gone
    assert load_state(checkpoints / "step-000000002") == {"step": 2}
