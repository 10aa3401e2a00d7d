"""The prior stage on synthetic digit-like token shards: training lowers the loss, resume is exact, the manifest
decides K / L / classes and records the tokenizer identity in the checkpoint."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data.shards import shard_name
from data.tokens import TokenManifest, TokenSample, write_token_shard
from pipelines import train_prior
from pipelines.checkpoint import latest_checkpoint, load_config
from data.errors import UserError
from pipelines.config import ConfigError, parse_config

K, GRID, CLASSES = 64, (4, 4), [str(c) for c in range(10)]
TINY = ["--batch_size=16", "--model.size=tiny", "--loop.warmup_steps=5", "--loop.log_every=5"]


def write_tokens(directory, n_train=320, n_val=64, seed=0, tokenizer_sha256="ab" * 32):
    """Class c's sequences walk from 6c in steps of 1 or 2 (mod K): mostly predictable given the class and the
    previous code, with enough noise that the loss cannot reach 0."""
    rng = np.random.default_rng(seed)
    counts = {}
    for split, n in (("train", n_train), ("val", n_val)):
        labels = rng.integers(0, len(CLASSES), n)
        steps = rng.choice([1, 2], p=[0.8, 0.2], size=(n, 16))
        codes = (6 * labels[:, None] + np.cumsum(steps, axis=1) - 1) % K  # (n, 16)
        samples = [TokenSample(f"{split}_{i:04d}", codes[i].reshape(GRID), int(labels[i])) for i in range(n)]
        write_token_shard(directory / shard_name(split, 0), samples, K)
        counts[split] = n
    TokenManifest(tokenizer_sha256=tokenizer_sha256, quantizer="simvq", num_codes=K, grid=list(GRID), counts=counts,
                  class_names=CLASSES, source_manifest_sha256="cd" * 32, shards={"train": 1, "val": 1}).save(directory)
    return directory


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    return write_tokens(tmp_path_factory.mktemp("tokens"))


def train(argv, base=None):
    return train_prior.main(parse_config(train_prior.TrainPriorConfig, argv, base))


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_training_lowers_loss_and_records_manifest(tokens, tmp_path):
    run = tmp_path / "run"
    final = train(TINY + [f"--tokens={tokens}", f"--out={run}", "--loop.steps=50", "--loop.lr=1e-3",
                          "--loop.eval_every=25", "--loop.ckpt_every=50"])
    logs = [r for r in read_log(run) if "train/loss" in r]
    first, last = logs[0]["train/loss"], logs[-1]["train/loss"]
    assert first > 3.0 and last < 0.6 * first, (first, last)  # ln 64 = 4.16 at the start
    # the stage's own loop defaults hold even though loop keys were overridden: cosine decay and clipping
    assert logs[-1]["lr/prior"] == pytest.approx(1e-4) and logs[1]["lr/prior"] > 5e-4 and "grad_norm/prior" in logs[0]
    val = [r for r in read_log(run) if "val/loss" in r]
    assert [r["step"] for r in val] == [25, 50]
    assert val[-1]["val/loss"] < val[0]["val/loss"] and val[-1]["val/accuracy"] > 0.3
    assert final["val/loss"] == val[-1]["val/loss"]
    config = load_config(latest_checkpoint(run))
    assert config["kind"] == "prior" and config["step"] == 50
    assert {k: config["config"][k] for k in ("num_codes", "seq_len", "num_classes")} == \
        {"num_codes": K, "seq_len": 16, "num_classes": 10}
    recorded = config["train_config"]["token_manifest"]
    assert recorded["tokenizer_sha256"] == "ab" * 32 and recorded["grid"] == list(GRID)
    assert recorded["num_codes"] == K and recorded["class_names"] == CLASSES and recorded["quantizer"] == "simvq"


def test_resume_matches_uninterrupted_run(tokens, tmp_path):
    # Constant LR after warm-up: a cosine schedule depends on loop.steps, so a 3-step run would follow a
    # different schedule than the first 3 steps of a 6-step one. EMA on, so its state is covered by the resume too.
    common = TINY + [f"--tokens={tokens}", "--loop.lr_schedule=constant", "--loop.ema_decay=0.99",
                     "--loop.eval_every=1000", "--loop.ckpt_every=3", "--model.label_dropout=0.5"]
    train(common + [f"--out={tmp_path / 'a'}", "--loop.steps=6"])
    train(common + [f"--out={tmp_path / 'b'}", "--loop.steps=3"])  # "interrupted" after step 3
    train(common + [f"--out={tmp_path / 'b'}", "--loop.steps=6", "--loop.resume=true"])
    a, b = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    assert a.name == b.name == "step-000000006"
    for name in ("model", "raw"):
        wa, wb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (name, k)
    # and the runs did move: step 6 differs from step 3
    w3 = load_file(str(tmp_path / "b" / "checkpoints" / "step-000000003" / "raw.safetensors"))
    assert any(not torch.equal(w3[k], wa[k]) for k in w3)


def test_manifest_decides_vocabulary(tokens, tmp_path):
    with pytest.raises(ConfigError, match=r"model.num_codes=128 but the token manifest says 64"):
        train(TINY + [f"--tokens={tokens}", f"--out={tmp_path / 'x'}", "--model.num_codes=128"])
    with pytest.raises(ConfigError, match=r"model.seq_len=32 but the token manifest says 16"):
        train(TINY + [f"--tokens={tokens}", f"--out={tmp_path / 'x'}"], base={"model": {"seq_len": 32}})
    with pytest.raises(ConfigError, match=r"model.num_classes=0 but the token manifest says 10"):
        train(TINY + [f"--tokens={tokens}", f"--out={tmp_path / 'x'}", "--model.num_classes=0"])  # set, not unset
    assert not (tmp_path / "x").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match=r"model: unknown prior size 'huge'"):  # checked when parsed
        parse_config(train_prior.TrainPriorConfig, ["--model.size=huge"])
    # agreeing values are fine
    train(TINY + [f"--tokens={tokens}", f"--out={tmp_path / 'y'}", "--model.num_codes=64",
                  "--model.num_classes=10", "--loop.steps=1"])


def test_missing_tokens_names_the_next_command(tmp_path):
    with pytest.raises(UserError, match="encode_shards"):
        train([f"--tokens={tmp_path / 'nothing'}", f"--out={tmp_path / 'run'}"])
