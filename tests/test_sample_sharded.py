"""sample under several processes and after a kill: the files (png and wav) of a one-process, uninterrupted run,
byte for byte; a rerun with other settings is refused. 2 CPU processes through torchrun, as in
tests/test_encode_shards.py (`accelerate launch --multi_gpu --num_processes=2` runs the same)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data.builtin import open_source
from data.files import sha256_file
from data.media import MediaSpec
from data.shards import read_manifest, shard_name, write_media_shards
from data.tokens import TokenManifest, TokenSample, media_timing, write_token_shard
from pipelines import sample, train_prior
from pipelines.checkpoint import save_checkpoint
from pipelines.config import parse_config, to_dict
from tokenizer import TokenizerConfig, build_tokenizer
from helpers import python_m, tone_shards

ROOT = Path(__file__).resolve().parents[1]
K = 64


def digit_shards(out, count: int = 120, max_count: int = 16):
    """Image media shards of the first `count` built-in digits, at most `max_count` a shard (several per split)."""
    source = open_source("digits", "image", 16, 0, 0, "auto")
    write_media_shards(source._replace(items=source.items[:count]), out, MediaSpec(modality="image", size=16),
                       val_fraction=0.25, max_count=max_count, log=lambda *a: None)
    return out


def tiny_run(root: Path, shards: Path) -> tuple[Path, Path]:
    """(tokenizer, prior) for the media of `shards`: an untrained tiny tokenizer whose train_config names them (so
    sample writes their file format) and a prior trained 3 steps on random token shards recorded as made from them
    by that tokenizer."""
    spec = read_manifest(shards).spec
    audio = spec.modality == "audio"
    torch.manual_seed(0)
    tok_cfg = (TokenizerConfig(size="audio-s", dims=1, in_channels=1, num_codes=K) if audio
               else TokenizerConfig(size="tiny", num_codes=K))
    tok = root / "tokenizer"
    model = build_tokenizer(tok_cfg)
    save_checkpoint(tok, config={"kind": "tokenizer", "config": to_dict(tok_cfg), "train_config": {"data": str(shards)}},
                    weights={"model": model.state_dict()})
    grid = list(model.grid_shape(spec.input_shape[1:]))
    class_names = list(read_manifest(shards).class_names)
    tokens = root / "tokens"
    tokens.mkdir()
    counts, rng = {}, np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 4)):
        labels = rng.integers(0, len(class_names), n)
        codes = (10 * labels.reshape(-1, *[1] * len(grid)) + rng.integers(0, 4, (n, *grid))) % K
        write_token_shard(tokens / shard_name(split, 0),
                          [TokenSample(f"{split}{i}", codes[i], int(labels[i])) for i in range(n)], K)
        counts[split] = n
    TokenManifest(tokenizer_sha256=sha256_file(tok / "model.safetensors"), quantizer="simvq", num_codes=K, grid=grid,
                  counts=counts, class_names=class_names, source_manifest_sha256=sha256_file(shards / "manifest.json"),
                  shards={"train": 1, "val": 1}, media=media_timing(spec, model.downsample_factor)).save(tokens)
    prior = root / "prior"
    train_prior.main(parse_config(train_prior.TrainPriorConfig, [
        f"--tokens={tokens}", f"--out={prior}", "--batch_size=8", "--model.size=tiny", "--loop.steps=3",
        "--loop.warmup_steps=0", "--loop.lr=1e-3"]))
    return tok, prior


def torchrun(*argv: str, processes: int = 2) -> str:
    """`python -m <argv>` in 2 CPU processes (processes=1: one fresh process, the one-process reference)."""
    return python_m(*argv, processes=processes, timeout=300)


def sample_files(folder: Path) -> list[Path]:
    """The finished sample files under folder/media (not the hidden temp files of a writer)."""
    return [p for p in (folder / "media").rglob("*") if p.is_file() and not p.name.startswith(".")]


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too: a temp file left behind counts), by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", params=["image", "audio"])
def run(request, tmp_path_factory):
    """(modality, tokenizer, prior, the --classes to sample)"""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "image":
        shards = digit_shards(root / "shards")
        return "image", *tiny_run(root, shards), "0,3,7"
    shards = tone_shards(root, per_class=6, rate=8_000, clip_seconds=0.512)
    return "audio", *tiny_run(root, shards), "high,low"


def args(run, out, *extra):
    _, tok, prior, classes = run
    return [f"--prior={prior}", f"--tokenizer={tok}", f"--out={out}", f"--classes={classes}", "--device=cpu", *extra]


def sample_main(run, out, *extra):
    return sample.main(parse_config(sample.SampleConfig, args(run, out, *extra)))


def test_a_killed_run_resumes_on_two_processes_to_the_files_of_one_uninterrupted_process(run, tmp_path):
    """One process killed (SIGKILL) once a few sample files exist, possibly inside a decoder group; the rerun with
    the same settings on 2 processes and another batch_size (neither changes a sample) makes only the groups with a
    missing file, rank 0 groups 0, 2, ... of them, rank 1 groups 1, 3, ...: every file (media, grids, manifest,
    run.json, and no temp file) is the one of a one-process run never interrupted. 11 per class in decoder groups
    of 2: the images' last group is short."""
    modality, _, _, classes = run
    settings = ["--num_per_class=11", "--decode_batch=2"]
    total = 11 * len(classes.split(","))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.sample", *args(run, killed, *settings, "--batch_size=1")],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(sample_files(killed)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read()  # killed, not finished or failed
    assert 3 <= len(sample_files(killed)) < total and not (killed / "manifest.json").exists()

    stdout = torchrun("pipelines.sample", *args(run, killed, *settings, "--batch_size=5"))
    assert "on 2 process(es)" in stdout and "sample[0]" in stdout and "sample[1]" in stdout, stdout
    torchrun("pipelines.sample", *args(run, tmp_path / "whole", *settings, "--batch_size=64"), processes=1)
    files = tree(tmp_path / "whole")
    assert len(json.loads(files["manifest.json"])["samples"]) == total == sum(p.startswith("media/") for p in files)
    assert all(p.endswith(".png" if modality == "image" else ".wav") for p in files if p.startswith("media/"))
    assert tree(killed) == files


def test_other_settings_are_refused_and_overwrite_starts_over(run, tmp_path, capsys):
    if run[0] == "audio":
        pytest.skip("the settings check does not depend on the modality")
    out = tmp_path / "s"
    sample_main(run, out, "--num_per_class=2", "--decode_batch=2")
    first = tree(out)
    (out / "manifest.json").unlink()  # an interrupted run: one decoder group missing a file
    (out / "media" / "3" / "000001.png").unlink()
    for extra, named in ((["--seed=1"], "seed: 0 there, 1 now"), (["--settings.top_k=5"], "settings.top_k: 0 there, 5"),
                         (["--num_per_class=3"], "num_per_class: 2 there, 3 now"),
                         (["--decode_batch=1"], "decode_batch: 2 there, 1 now")):
        with pytest.raises(sample.SamplesExist, match="--overwrite=true") as err:
            sample_main(run, out, "--num_per_class=2", "--decode_batch=2", *extra)
        assert named in str(err.value) and "\n" not in str(err.value)
    capsys.readouterr()
    sample_main(run, out, "--num_per_class=2", "--decode_batch=2", "--batch_size=1")  # the same settings: resumes
    assert "2 of 6 samples to make (4 already in" in capsys.readouterr().out  # the missing file's whole group
    assert tree(out) == first
    sample_main(run, out, "--num_per_class=2", "--decode_batch=2")  # a finished run: nothing to make, same files
    assert tree(out) == first

    sample_main(run, out, "--num_per_class=2", "--decode_batch=2", "--seed=1", "--overwrite=true")
    assert json.loads((out / "run.json").read_text())["seed"] == 1
    assert tree(out)["media/0/000000.png"] != first["media/0/000000.png"]
    (out / "run.json").unlink()  # samples whose settings are unknown
    with pytest.raises(sample.SamplesExist, match="without run.json .* --overwrite=true"):
        sample_main(run, out, "--num_per_class=2", "--decode_batch=2", "--seed=1")
