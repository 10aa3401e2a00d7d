"""Scale-out: the prior stage under torchrun with 2 CPU processes (gloo), on one "node" and as two "nodes" meeting
through a c10d rendezvous; the checkpoint they write loads and resumes in a single process; processes that see
different checkpoints refuse together; FSDP / DeepSpeed are refused with one line at Trainer construction."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from data.errors import UserError
from pipelines import cli, train_prior
from pipelines.checkpoint import latest_checkpoint, load_prior
from pipelines.config import parse_config
from pipelines.trainer import LoopConfig, Trainer, make_accelerator

from test_train_prior import write_tokens

TINY = ["--batch_size=8", "--model.size=tiny", "--loop.warmup_steps=2", "--loop.log_every=1", "--loop.ema_decay=0.9",
        "--loop.eval_every=4", "--loop.ckpt_every=4", "--eval_batches=2"]

# The stage as `accelerate launch -m pipelines.train_prior` runs it, plus: every process saves its final parameters
# (raw and EMA) for the test to compare across ranks; FAKE_CHECKPOINT_ON_RANK makes one rank see another checkpoint, and
# each rank that refuses it records its error next to the run directory (torchrun stops the other worker as soon as
# one fails, which can cut off its printed line).
SCRIPT = """
import os, sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from pipelines import trainer as trainer_module, train_prior
from pipelines.cli import run
from pipelines.trainer import Trainer

fit, real_latest, real_agreed = Trainer.fit, trainer_module.latest_checkpoint, Trainer.latest_checkpoint

def fit_and_save_parameters(self, *args, **kwargs):
    out = fit(self, *args, **kwargs)
    params = {{f"raw/{{k}}": p.detach() for k, p in self.unwrap("prior").named_parameters()}}
    params.update({{f"ema/{{k}}": p.detach() for k, p in self.ema.module.named_parameters()}})
    torch.save(params, self.run_dir / f"params-rank{{self.accelerator.process_index}}.pt")
    return out

def latest(run_dir):
    if os.environ.get("FAKE_CHECKPOINT_ON_RANK") == os.environ["RANK"]:
        return Path(run_dir) / "checkpoints" / "step-000000099"
    return real_latest(run_dir)

def agreed_or_record(self):
    try:
        return real_agreed(self)
    except Exception as e:
        (self.run_dir.parent / f"refused-rank{{os.environ['RANK']}}.txt").write_text(str(e))
        raise

Trainer.fit = fit_and_save_parameters
trainer_module.latest_checkpoint = latest
Trainer.latest_checkpoint = agreed_or_record
run(train_prior.main, train_prior.TrainPriorConfig)
"""


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return write_tokens(tmp_path_factory.mktemp("tokens"))


def launcher_env(**extra) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def script(tmp_path: Path) -> Path:
    path = tmp_path / "train_prior_ranks.py"
    path.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def check_one_run_in_sync(run: Path, steps: int) -> None:
    """One checkpoint and one log line per step (the main process writes), identical parameters on both ranks, and
    the checkpoint holds rank 0's EMA (model) and raw weights and loads as a prior in this single process."""
    assert [c.name for c in (run / "checkpoints").iterdir()] == [f"step-{steps:09d}"]
    assert [r["step"] for r in read_log(run) if "train/loss" in r] == list(range(1, steps + 1))
    ranks = [torch.load(run / f"params-rank{i}.pt", weights_only=True) for i in (0, 1)]
    assert len(ranks[0]) > 10 and [k for k in ranks[0] if not torch.equal(ranks[0][k], ranks[1][k])] == []
    raw0 = {k.removeprefix("raw/"): v for k, v in ranks[0].items() if k.startswith("raw/")}
    assert not torch.equal(raw0["net.token_emb.emb.weight"],
                           ranks[0]["ema/net.token_emb.emb.weight"])  # the EMA is a real average, not a copy
    prior, ckpt, _ = load_prior(run)
    exported = dict(prior.named_parameters())
    assert all(torch.equal(exported[k.removeprefix("ema/")], v) for k, v in ranks[0].items() if k.startswith("ema/"))
    raw = load_file(ckpt / "raw.safetensors")
    assert all(torch.equal(raw[k], v) for k, v in raw0.items())


def test_two_processes_keep_the_prior_in_sync_and_one_process_resumes(tokens, tmp_path):
    """torchrun --standalone, 2 CPU processes (gloo): DDP keeps the prior's parameters (and EMA) identical on both
    ranks; the checkpoint loads in one process, and a single-process run resumes it (a world-size change: the data
    order differs from the 2-process run's, the weights, optimiser, scheduler and step carry over)."""
    run = tmp_path / "run"
    common = [*TINY, f"--tokens={tokens}", f"--out={run}", "--loop.lr_schedule=constant", "--loop.warmup_steps=8"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script(tmp_path)),
           *common, "--loop.steps=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=launcher_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_one_run_in_sync(run, steps=4)
    val = [r for r in read_log(run) if "val/loss" in r]
    assert [r["step"] for r in val] == [4]

    final = train_prior.main(parse_config(train_prior.TrainPriorConfig, common + ["--loop.steps=6", "--resume"]))
    assert latest_checkpoint(run).name == "step-000000006" and "val/loss" in final
    logs = [r for r in read_log(run) if "train/loss" in r]
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5, 6]
    # the LR warm-up continued at step 5 of 8 (a fresh scheduler would be at step 1 of 8)
    assert [r["lr/prior"] for r in logs] == pytest.approx([3e-4 * (k + 1) / 8 for k in range(1, 7)])


def test_two_nodes_meet_through_a_c10d_rendezvous(tokens, tmp_path):
    """Two torchrun agents, one process each, as two nodes would start them (--nnodes=2, --node_rank, a c10d
    rendezvous at the first node's address): one run, one checkpoint, parameters in sync."""
    run, port = tmp_path / "run", free_port()
    procs = []
    try:
        for node in (0, 1):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                   f"--node_rank={node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                   "--rdzv-id=test-two-nodes", f"--rdzv-conf=is_host={int(node == 0)},join_timeout=120",
                   str(script(tmp_path)), *TINY, f"--tokens={tokens}", f"--out={run}", "--loop.steps=4"]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=launcher_env()))
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(err[-2000:] for _, err in outs)
    check_one_run_in_sync(run, steps=4)


def test_processes_that_see_different_checkpoints_refuse_together(tokens, tmp_path):
    """A run directory that is not shared between nodes shows each process other checkpoints: resume (and the
    fresh-run check) refuse on every process with the same one-line error, instead of ranks starting at different
    steps and hanging in the first all-reduce."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script(tmp_path)),
           *TINY, f"--tokens={tokens}", f"--out={run}", "--loop.steps=4", "--loop.resume=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=launcher_env(FAKE_CHECKPOINT_ON_RANK="1"),
                          timeout=600)
    assert proc.returncode != 0
    assert "train_prior: error: --out=" in proc.stderr and "see different newest checkpoints" in proc.stderr
    errors = [(tmp_path / f"refused-rank{rank}.txt").read_text() for rank in (0, 1)]
    assert errors[0] == errors[1] and "shared filesystem path" in errors[0] and "step-000000099" in errors[0]
    assert not (run / "checkpoints").exists()


def new_trainer(tmp_path, accelerator=None) -> Trainer:
    return Trainer(LoopConfig(), tmp_path / "run", kind="prior", model_config={}, full_config={},
                   accelerator=accelerator)


def test_fsdp_from_the_launcher_is_refused_in_one_line(tokens, tmp_path, monkeypatch, capsys):
    """`accelerate launch --use_fsdp` (or an accelerate config with FSDP) sets ACCELERATE_USE_FSDP=true: refused at
    Trainer construction, before anything is written, with one line naming the setting and the fix (on a CPU
    accelerate would silently ignore the variable and train without FSDP)."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError) as err:
        new_trainer(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "FSDP (ACCELERATE_USE_FSDP=true)" in message
    assert "accelerate config" in message and "DDP" in message
    assert not (tmp_path / "run").exists()
    # and through the stage's command line: exit status 2 and that one line
    with pytest.raises(SystemExit) as exit_:
        cli.run(train_prior.main, train_prior.TrainPriorConfig, [f"--tokens={tokens}", f"--out={tmp_path / 'run'}", *TINY])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("mode", [DistributedType.FSDP, DistributedType.DEEPSPEED])
def test_a_sharded_accelerator_is_refused(tmp_path, monkeypatch, mode):
    """An Accelerator whose state says FSDP / DeepSpeed (what a GPU launch with those settings builds) is refused too,
    and the same accelerator in plain mode is accepted."""
    accelerator = make_accelerator(LoopConfig())
    new_trainer(tmp_path / "plain", accelerator)
    monkeypatch.setattr(accelerator.state, "distributed_type", mode)
    with pytest.raises(UserError, match=f"distributed_type {mode.value}.*run plain DDP"):
        new_trainer(tmp_path, accelerator)
