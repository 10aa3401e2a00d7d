"""encode_shards: codes read back equal the tokenizer's, every sample once, exact resume, refusal of foreign tokens."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.builtin import open_source
from data.files import TEMP_MARK, sha256_file
from data.media import MediaSpec
from data.reader import media_loader
from data.shards import ManifestError, iter_shard_samples, list_shards, read_manifest, write_media_shards
from data.tokens import TokenManifest, load_tokens
from pipelines import encode_shards
from pipelines.checkpoint import save_checkpoint, weights_sha256
from pipelines.config import ConfigError, parse_config, to_dict
from tokenizer import TokenizerConfig, build_tokenizer

SIZE = 16  # digits side; the tiny net downsamples by 4 -> a 4x4 grid


def make_tokenizer(path, seed: int):
    torch.manual_seed(seed)
    tok_cfg = TokenizerConfig(size="tiny", num_codes=64)
    model = build_tokenizer(tok_cfg).eval()
    save_checkpoint(path, config={"kind": "tokenizer", "config": to_dict(tok_cfg)},
                    weights={"model": model.state_dict()})
    return model


def make_media(out, count: int, val_fraction: float = 0.25):
    source = open_source("digits", "image", SIZE, 0, 0, "auto")
    source = source._replace(items=source.items[:count])
    write_media_shards(source, out, MediaSpec(modality="image", size=SIZE), val_fraction=val_fraction, max_count=12,
                       log=lambda *a: None)
    return out


def encode(media, tok, out, *extra):
    return encode_shards.main(parse_config(encode_shards.EncodeShardsConfig, [
        f"--data={media}", f"--tokenizer={tok}", f"--out={out}", "--batch_size=8", "--device=cpu", *extra]))


def reference_codes(model, media) -> dict[str, tuple[list[int], int]]:
    """key -> (flattened codes, label), through the webdataset eval loader (not encode_shards' own reader)."""
    ref = {}
    for split in ("train", "val"):
        for batch in media_loader(media, split, batch_size=32, train=False):
            with torch.no_grad():
                codes = model.encode(batch.x).flatten(1)  # (B, h*w) raster order
            for key, c, label in zip(batch.keys, codes, batch.labels):
                assert key not in ref
                ref[key] = (c.tolist(), int(label))
    return ref


def read_back(out) -> dict[str, tuple[list[int], int]]:
    got = {}
    for split in ("train", "val"):
        tokens = load_tokens(out, split)
        assert len(set(tokens.keys)) == len(tokens.keys), "duplicate samples"
        for key, c, label in zip(tokens.keys, tokens.codes, tokens.labels):
            assert key not in got
            got[key] = (c.astype(int).tolist(), int(label))
    return got


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    media = make_media(root / "media", count=70)  # 54 train in 5 shards, 16 val in 2
    # a run directory: resolve_checkpoint must pick its newest checkpoint
    model = make_tokenizer(root / "run" / "checkpoints" / "step-000000010", seed=0)
    return root, media, reference_codes(model, media)


def test_round_trip_and_manifest(setup, tmp_path):
    root, media, ref = setup
    out = tmp_path / "tokens"
    manifest = encode(media, root / "run", out)
    got = read_back(out)
    assert got == ref  # same keys (each once), same codes in raster order, same labels
    assert len(got) == 70 and len({label for _, label in got.values()}) == 10
    assert any(len(set(codes)) > 1 for codes, _ in got.values())  # not a degenerate all-one-code encoding

    media_manifest = read_manifest(media)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert manifest == TokenManifest.load(out)
    assert on_disk["tokenizer_sha256"] == sha256_file(root / "run/checkpoints/step-000000010/model.safetensors")
    assert on_disk["tokenizer_sha256"] == weights_sha256(root / "run/checkpoints/step-000000010")
    assert on_disk["source_manifest_sha256"] == sha256_file(media / "manifest.json")
    assert on_disk["quantizer"] == "simvq" and on_disk["num_codes"] == 64 and on_disk["dtype"] == "uint8"
    assert on_disk["grid"] == [SIZE // 4, SIZE // 4]
    assert on_disk["counts"] == media_manifest.counts and on_disk["shards"] == media_manifest.shards
    assert media_manifest.shards["train"] >= 3 and media_manifest.shards["val"] >= 1  # the test needs several shards
    assert on_disk["class_names"] == [str(i) for i in range(10)]
    assert (on_disk["format"], on_disk["version"]) == ("simvq-token-shards", 1)
    assert on_disk["media"] == {"modality": "image", "size": SIZE, "downsample_factor": 4}
    # each token shard holds exactly the keys of the media shard of the same name
    for split in ("train", "val"):
        for path in list_shards(media, split):
            media_keys = [k for k, _ in iter_shard_samples(path)]
            token_keys = [k for k, _ in iter_shard_samples(out / path.name)]
            assert token_keys == media_keys


def test_resume_after_interruption(setup, tmp_path, monkeypatch):
    root, media, ref = setup
    out = tmp_path / "tokens"
    real_write, calls = encode_shards.write_token_shard, []

    def dying_write(path, samples, num_codes, grid):
        """The third shard dies half-way through (as a kill would), after two shards were finished."""
        calls.append(path.name)
        if len(calls) == 3:
            def half():
                for i, s in enumerate(samples):
                    if i == 5:
                        raise KeyboardInterrupt
                    yield s
            return real_write(path, half(), num_codes, grid)
        return real_write(path, samples, num_codes, grid)

    monkeypatch.setattr(encode_shards, "write_token_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        encode(media, root / "run", out)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists()  # an interrupted encode is not readable as finished
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(calls[:2]) and not list(out.glob(f"*{TEMP_MARK}*"))
    with pytest.raises(ManifestError, match="manifest.json not found"):
        load_tokens(out, "train")
    kept = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}

    killed = out / f".{Path(calls[2]).stem}{TEMP_MARK}99999.tar"  # a SIGKILLed writer's temp file: removed, never read
    killed.write_bytes(b"garbage")
    encode(media, root / "run", out)
    assert {n: (out / n).stat().st_ino for n in kept} == {n: ino for n, (ino, _) in kept.items()}  # not re-encoded
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == {n: t for n, (_, t) in kept.items()}
    assert read_back(out) == ref  # every sample exactly once
    assert not list(out.glob(f"*{TEMP_MARK}*"))

    # deleting finished shards and the manifest: the rerun redoes exactly those, byte-identical
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    for name in ("train-000000.tar", "val-000000.tar"):
        (out / name).unlink()
    (out / "manifest.json").unlink()
    manifest = encode(media, root / "run", out)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    assert manifest.counts == read_manifest(media).counts


def test_refuses_other_tokenizer_or_media(setup, tmp_path):
    root, media, _ = setup
    out = tmp_path / "tokens"
    encode(media, root / "run", out)
    other = make_tokenizer(tmp_path / "other", seed=1)
    with pytest.raises(ManifestError, match=r"tokenizer_sha256.*overwrite=true"):
        encode(media, tmp_path / "other", out)
    other_media = make_media(tmp_path / "media2", count=30)
    with pytest.raises(ManifestError, match=r"source_manifest_sha256.*overwrite=true"):
        encode(other_media, root / "run", out)

    # an interrupted directory (shards, no manifest yet) is refused too: encode.json records its origin
    (out / "manifest.json").unlink()
    (out / "val-000000.tar").unlink()
    with pytest.raises(ManifestError, match=r"tokenizer_sha256: .*encode.json has"):
        encode(media, tmp_path / "other", out)
    json_path = out / encode_shards.IDENTITY
    json_path.unlink()
    with pytest.raises(ManifestError, match="tokenizer is unknown"):
        encode(media, root / "run", out)

    manifest = encode(media, tmp_path / "other", out, "--overwrite=true")
    assert manifest.tokenizer_sha256 == weights_sha256(tmp_path / "other")
    assert read_back(out) == reference_codes(other, media)


def test_splits_and_bad_config(setup, tmp_path):
    root, media, _ = setup
    out = tmp_path / "tokens"
    manifest = encode(media, root / "run", out, "--splits=val")
    assert list(manifest.counts) == ["val"] and not list_shards(out, "train")
    manifest = encode(media, root / "run", out)  # adding train later keeps the val shards
    assert manifest.counts == read_manifest(media).counts
    with pytest.raises(ConfigError, match="splits: 'test' is not one of"):
        encode(media, root / "run", out, "--splits=test")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        encode(media, tmp_path / "nothing", out)


def test_two_processes_resume_to_the_same_bytes(setup, tmp_path):
    """torchrun with 2 CPU processes (what `accelerate launch --multi_gpu --num_processes=2` runs): the pending
    shards are split across ranks, rank 0 writes the manifest, and the result equals the one-process encode."""
    root, media, _ = setup
    single, multi = tmp_path / "single", tmp_path / "multi"
    encode(media, root / "run", single)
    encode(media, root / "run", multi)
    for name in ("train-000000.tar", "train-000003.tar", "val-000001.tar", "manifest.json"):  # an interrupted run
        (multi / name).unlink()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "pipelines.encode_shards", f"--data={media}", f"--tokenizer={root / 'run'}", f"--out={multi}",
           "--batch_size=8", "--device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout and "3 of 7 shards" in proc.stdout, proc.stdout
    assert "encode_shards[0]" in proc.stdout and "encode_shards[1]" in proc.stdout  # both ranks did work
    tars = lambda d: {p.name: p.read_bytes() for p in d.glob("*.tar")}  # noqa: E731
    assert tars(multi) == tars(single)
    assert TokenManifest.load(multi) == TokenManifest.load(single)


def test_audio_tokens_record_rate_and_hop_and_train_a_prior(tmp_path):
    """Audio through the same encode: codes (T / hop,) per clip, and the manifest says what a token lasts (sample rate,
    hop, tokens per second); train_prior takes the token shards unchanged."""
    from helpers import tone_shards
    from pipelines import train_prior
    rate, clip = 8_000, 0.512  # 4,096 samples; audio-s has hop 64 -> 64 tokens
    media = tone_shards(tmp_path, per_class=4, rate=rate, clip_seconds=clip)
    torch.manual_seed(0)
    tok_cfg = TokenizerConfig(size="audio-s", dims=1, in_channels=1, num_codes=64)
    save_checkpoint(tmp_path / "tok", config={"kind": "tokenizer", "config": to_dict(tok_cfg)},
                    weights={"model": build_tokenizer(tok_cfg).state_dict()})
    manifest = encode(media, tmp_path / "tok", tmp_path / "tokens")
    assert manifest.grid == [64] and manifest.media == {"modality": "audio", "sample_rate": rate, "hop": 64,
                                                        "tokens_per_second": rate / 64, "clip_seconds": clip}
    assert manifest.seq_len / manifest.media["tokens_per_second"] == pytest.approx(clip)
    assert load_tokens(tmp_path / "tokens", "train").codes.shape == (manifest.counts["train"], 64)
    logs = train_prior.main(parse_config(train_prior.TrainPriorConfig, [
        f"--tokens={tmp_path / 'tokens'}", f"--out={tmp_path / 'prior'}", "--batch_size=4", "--model.size=tiny",
        "--loop.steps=2", "--loop.warmup_steps=0"]))
    prior_config = json.loads(next((tmp_path / "prior" / "checkpoints").iterdir()).joinpath("config.json").read_text())
    assert prior_config["train_config"]["token_manifest"]["media"] == manifest.media  # carried to sample
    assert all(math.isfinite(v) for v in logs.values() if isinstance(v, float))
