"""Token shards: byte-exact round trip per dtype, manifest checks, loader order and resume, pending shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.files import temp_path
from data.shards import ManifestError, iter_shard_samples, shard_name
from data.media import MediaSpec
from data.tokens import (TokenManifest, TokenSample, code_dtype, load_tokens, media_timing, pending_token_shards,
                         token_loader, write_token_shard)

GRID = (3, 4)


def manifest_for(num_codes: int, counts: dict[str, int], shards: dict[str, int]) -> TokenManifest:
    return TokenManifest(tokenizer_sha256="ab" * 32, quantizer="simvq", num_codes=num_codes, grid=list(GRID),
                         counts=counts, class_names=["a", "b", "c"], source_manifest_sha256="cd" * 32, shards=shards)


def write_split(directory, num_codes: int, n: int, seed: int = 0, per_shard: int = 4):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, num_codes, (n, *GRID))
    codes[0].flat[:2] = [0, num_codes - 1]  # the extremes must survive the dtype
    labels = rng.integers(-1, 3, n)
    keys = [f"dir.x/img_{i:03d}" for i in range(n)]
    samples = [TokenSample(k, torch.from_numpy(c) if i % 2 else c, int(l))
               for i, (k, c, l) in enumerate(zip(keys, codes, labels))]
    shards = 0
    for start in range(0, n, per_shard):
        write_token_shard(directory / shard_name("train", shards), samples[start : start + per_shard], num_codes)
        shards += 1
    manifest_for(num_codes, {"train": n}, {"train": shards}).save(directory)
    return codes, labels, keys


@pytest.mark.parametrize("num_codes, dtype", [(1_024, "uint16"), (300, "uint16"), (262_144, "int32"),
                                              (65_536, "uint16"), (65_537, "int32"), (256, "uint8")])
def test_round_trip(tmp_path, num_codes, dtype):
    assert code_dtype(num_codes).name == dtype
    codes, labels, keys = write_split(tmp_path, num_codes, n=10)
    raw = dict(iter_shard_samples(tmp_path / shard_name("train", 0)))[keys[0]]["codes"]
    assert raw == codes[0].reshape(-1).astype(f"<{code_dtype(num_codes).str[1:]}").tobytes()  # raster, little-endian
    loaded = load_tokens(tmp_path, "train")
    assert loaded.keys == keys and loaded.labels.tolist() == labels.tolist()
    assert np.array_equal(loaded.codes.astype(np.int64), codes.reshape(10, -1))  # (N, h*w) row-major
    assert TokenManifest.load(tmp_path).dtype == dtype
    batches = list(token_loader(tmp_path, "train", batch_size=4, shuffle=False))
    assert [b.tokens.shape for b in batches] == [(4, 12), (4, 12), (2, 12)]
    assert batches[0].tokens.dtype == torch.long and torch.equal(batches[0].tokens, torch.from_numpy(codes[:4]).reshape(4, 12))
    assert batches[2].labels.tolist() == labels[8:].tolist()


def test_writer_rejects_bad_codes(tmp_path):
    with pytest.raises(ValueError, match=r"outside \[0, 300\)"):
        write_token_shard(tmp_path / "t.tar", [TokenSample("k", np.array([[300]]), 0)], num_codes=300)
    with pytest.raises(ValueError, match="expected"):
        write_token_shard(tmp_path / "t.tar", [TokenSample("a", np.zeros((2, 2), int), 0),
                                               TokenSample("b", np.zeros((2, 3), int), 0)], num_codes=8)
    assert not list(tmp_path.iterdir())  # atomic: nothing, not even the temp file, is left behind


def test_manifest_mismatch_and_version_errors(tmp_path):
    write_split(tmp_path, 1_024, n=5)
    manifest = TokenManifest.load(tmp_path)
    manifest.check_compatible(num_codes=1_024, grid=GRID, quantizer="simvq", class_names=["a", "b", "c"])
    with pytest.raises(ManifestError, match=r"num_codes: token shards have 1024, expected 4096.*grid.*encode_shards"):
        manifest.check_compatible(num_codes=4_096, grid=(16, 16), quantizer="simvq")
    with pytest.raises(ManifestError, match="tokenizer_sha256"):
        manifest.check_compatible(tokenizer_sha256="00" * 32)
    with pytest.raises(TypeError, match="unknown fields"):
        manifest.check_compatible(codebook_size=1_024)
    d = json.loads((tmp_path / "manifest.json").read_text())
    old = {k: v for k, v in d.items() if k != "media"}  # written before TokenManifest.media existed: still loads
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    assert TokenManifest.load(tmp_path).media == {} and TokenManifest.load(tmp_path) == manifest
    (tmp_path / "manifest.json").write_text(json.dumps(d | {"version": 0}))
    with pytest.raises(ManifestError, match="version 0"):
        TokenManifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(d | {"dtype": "uint8"}))
    with pytest.raises(ManifestError, match="dtype uint8"):
        TokenManifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps(d | {"grid": [4, 4]}))
    with pytest.raises(ManifestError, match="code bytes"):
        load_tokens(tmp_path, "train")
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="manifest.json not found.*encode_shards"):
        load_tokens(tmp_path, "train")


def test_shuffled_loader_is_seeded_resumable_and_rank_split(tmp_path):
    write_split(tmp_path, 1_024, n=22)
    state = torch.get_rng_state()
    run = lambda **kw: [b.tokens for b in token_loader(tmp_path, "train", 4, shuffle=True, seed=1, **kw)]  # noqa: E731
    full = run(epoch=3)
    assert torch.equal(state, torch.get_rng_state()) and len(full) == 5  # 22 // 4, last partial dropped
    assert all(torch.equal(a, b) for a, b in zip(run(epoch=3), full))
    assert all(torch.equal(a, b) for a, b in zip(run(epoch=3, skip_batches=2), full[2:]))
    assert not torch.equal(run(epoch=4)[0], full[0])
    ranks = [torch.cat(run(epoch=3, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 8  # 11 rows each, whole batches of 4
    rows = {tuple(r.tolist()) for t in ranks for r in t}
    assert len(rows) == 16  # disjoint across ranks


def test_pending_shards_lists_only_missing_ones(tmp_path):
    media, tokens = tmp_path / "media", tmp_path / "tokens"
    media.mkdir(), tokens.mkdir()
    for name in (shard_name("train", 0), shard_name("train", 1), shard_name("val", 0)):
        (media / name).write_bytes(b"")
    write_token_shard(tokens / shard_name("train", 1), [TokenSample("k", np.zeros(GRID, int), 0)], 16)
    temp_path(tokens / shard_name("val", 0)).write_bytes(b"partial")  # an interrupted write does not count
    pending = pending_token_shards(media, tokens)
    assert [(p.split, p.index) for p in pending] == [("train", 0), ("val", 0)]
    assert pending[1].token_path == tokens / "val-000000.tar"


def test_media_timing_says_what_a_token_stands_for():
    speech = media_timing(MediaSpec(modality="audio", sample_rate=16_000, clip_seconds=1.0), 320)
    assert speech == {"modality": "audio", "sample_rate": 16_000, "hop": 320, "tokens_per_second": 50.0,
                      "clip_seconds": 1.0}
    paper = media_timing(MediaSpec(modality="audio", sample_rate=24_000), 320)
    assert paper["tokens_per_second"] == 75.0  # the paper's 75 tokens per second
    assert media_timing(MediaSpec(modality="image", size=128), 8) == {"modality": "image", "size": 128,
                                                                     "downsample_factor": 8}
