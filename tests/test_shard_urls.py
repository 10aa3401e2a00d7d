"""Shards read from a URL (an http server on 127.0.0.1, a `pipe:` command) give exactly what the local directory gives:
the manifest, eval and train batches, a tokenizer's training run, encode_shards' token shards and train_prior's run;
a URL's mistakes are one-line errors, and nothing is run that the user did not write as `pipe:`."""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data.errors import UserError
from data.reader import media_loader
from data.shards import ManifestError, list_shards, manifest_sha256, read_manifest
from data.tokens import TokenManifest, load_tokens, token_loader
from pipelines import train_prior, train_tokenizer
from pipelines.checkpoint import latest_checkpoint
from pipelines.config import parse_config

from test_encode_shards import encode, make_media, make_tokenizer
from test_train_prior import TINY as PRIOR_TINY
from test_train_prior import write_tokens
from test_train_tokenizer import TINY, read_log


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(root, base URL): `python -m http.server` on a free port of 127.0.0.1 serving root/ (media shards in
    root/media: 54 train samples in 5 shards, 16 val in 2); stopped at teardown."""
    root = tmp_path_factory.mktemp("served")
    make_media(root / "media", count=70)
    server = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory",
                               str(root)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = re.search(r" port (\d+) ", server.stdout.readline()).group(1)  # "Serving HTTP on 127.0.0.1 port N ..."
        yield root, f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def locations(root, base) -> dict[str, str]:
    return {"http": f"{base}/media/", "pipe": f"pipe:cat {root / 'media'}/{{}}"}


def batches(location, split: str, train: bool):
    kw = dict(seed=3, epoch=1, epoch_len=5, shuffle_buffer=20) if train else {}
    return [(b.keys, b.x, b.labels) for b in media_loader(location, split, batch_size=8, train=train, **kw)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(ka == kb and torch.equal(xa, xb) and torch.equal(la, lb)
                                    for (ka, xa, la), (kb, xb, lb) in zip(a, b))


@pytest.mark.parametrize("kind", ["http", "pipe"])
def test_a_url_reads_like_the_directory(served, kind):
    root, base = served
    local, url = root / "media", locations(root, base)[kind]
    manifest = read_manifest(url)
    assert manifest == read_manifest(local) and manifest.shard_names["train"] == [p.name for p in
                                                                                   list_shards(local, "train")]
    assert manifest_sha256(url) == manifest_sha256(local)
    for split, train in (("val", False), ("train", False), ("train", True)):
        expected = batches(local, split, train)
        assert len(expected) >= 2 and same(batches(url, split, train), expected), (split, train)


def test_a_tokenizer_trains_on_http_shards_exactly_as_on_the_directory(served, tmp_path):
    root, base = served
    common = TINY + ["--loop.steps=2", "--loop.log_every=1", "--loop.eval_every=2", "--loop.ckpt_every=2",
                     "--eval_batches=1"]
    for name, data in (("local", root / "media"), ("http", f"{base}/media")):
        train_tokenizer.main(parse_config(train_tokenizer.TrainTokenizerConfig,
                                          common + [f"--data={data}", f"--out={tmp_path / name}"]))
    logged = {name: [{k: v for k, v in r.items() if "/" in k} for r in read_log(tmp_path / name)]  # not steps_per_s
              for name in ("local", "http")}
    assert logged["http"] == logged["local"]
    assert sum("recon/l1" in r for r in logged["local"]) == 2 and any("val/psnr" in r for r in logged["local"])
    a, b = latest_checkpoint(tmp_path / "local"), latest_checkpoint(tmp_path / "http")
    assert a.name == b.name == "step-000000002"
    for file in ("model", "raw", "d"):
        wa, wb = load_file(str(a / f"{file}.safetensors")), load_file(str(b / f"{file}.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), file


def test_encode_shards_reads_media_from_a_url(served, tmp_path):
    root, base = served
    make_tokenizer(tmp_path / "tok", seed=0)
    local = encode(root / "media", tmp_path / "tok", tmp_path / "local")
    remote = encode(f"{base}/media", tmp_path / "tok", tmp_path / "http")
    assert remote == local and remote.shard_names == read_manifest(root / "media").shard_names
    names = sorted(p.name for p in (tmp_path / "local").glob("*.tar"))
    assert names == sorted(p.name for p in (tmp_path / "http").glob("*.tar")) and len(names) == 7
    assert all((tmp_path / "local" / n).read_bytes() == (tmp_path / "http" / n).read_bytes() for n in names)
    # and the tokens themselves are readable from the server
    shutil.copytree(tmp_path / "local", root / "tokens")
    assert TokenManifest.load(f"{base}/tokens") == local
    got, expected = load_tokens(f"{base}/tokens", "train"), load_tokens(root / "tokens", "train")
    assert got.keys == expected.keys and len(got.keys) == 54
    assert np.array_equal(got.codes, expected.codes) and np.array_equal(got.labels, expected.labels)


def test_a_prior_trains_on_http_tokens_exactly_as_on_the_directory(served, tmp_path):
    root, base = served
    (root / "prior-tokens").mkdir()
    write_tokens(root / "prior-tokens")
    common = PRIOR_TINY + ["--loop.steps=2", "--loop.eval_every=2", "--loop.ckpt_every=2", "--eval_batches=1"]
    for name, tokens in (("local", root / "prior-tokens"), ("http", f"{base}/prior-tokens")):
        train_prior.main(parse_config(train_prior.TrainPriorConfig, common + [
            f"--tokens={tokens}", f"--out={tmp_path / name}", f"--token_cache={tmp_path / 'cache'}"]))
    a, b = latest_checkpoint(tmp_path / "local"), latest_checkpoint(tmp_path / "http")
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the directory's entry and the URL's (keyed differently), in --token_cache; nothing written where the URL points
    assert len(list((tmp_path / "cache").glob("train-*"))) == 2 and not (root / "prior-tokens" / "cache").exists()
    http_batches = list(token_loader(f"{base}/prior-tokens", "val", 16, shuffle=False, cache_dir=tmp_path / "c2"))
    local_batches = list(token_loader(root / "prior-tokens", "val", 16, shuffle=False, cache_dir=tmp_path / "c3"))
    assert len(http_batches) == 4 and all(torch.equal(x.tokens, y.tokens) and torch.equal(x.labels, y.labels)
                                          for x, y in zip(http_batches, local_batches))


def test_url_mistakes_are_one_line_errors_and_run_nothing_unasked(served, tmp_path, monkeypatch):
    root, base = served
    with pytest.raises(ManifestError, match=r"/nothing/manifest.json not found.*make_shards"):
        read_manifest(f"{base}/nothing")  # HTTP 404
    with pytest.raises(ManifestError, match=r"manifest.json not found.*encode_shards"):
        TokenManifest.load(f"{base}/nothing")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(UserError, match=r"cannot read http://127.0.0.1:\d+/x/manifest.json.*server is up"):
        read_manifest(f"http://127.0.0.1:{closed}/x")
    with pytest.raises(UserError, match=r"needs \{\} where the file name goes"):
        read_manifest(f"pipe:cat {root / 'media'}/manifest.json")
    with pytest.raises(UserError, match=r"exited with status 1.*fix the pipe: command"):
        read_manifest(f"pipe:cat {tmp_path}/missing/{{}}")
    # a manifest may only name plain files: a name with shell syntax is refused before any command runs
    evil = tmp_path / "evil"
    evil.mkdir()
    d = json.loads((root / "media" / "manifest.json").read_text())
    marker = tmp_path / "ran"
    d["shard_names"]["val"] = [f"x.tar; touch {marker}"] + d["shard_names"]["val"][1:]
    (evil / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="not a plain file name"):
        media_loader(f"pipe:cat {evil}/{{}}", "val", batch_size=4, train=False)
    assert not marker.exists()
    # a local directory is opened by absolute path, never as a URL: as the relative "pipe:local/val-000000.tar"
    # webdataset would run `local/val-000000.tar`
    shutil.copytree(root / "media", tmp_path / "pipe:local")
    monkeypatch.chdir(tmp_path)
    assert same(batches("./pipe:local", "val", False), batches(root / "media", "val", False))


def test_old_manifests_without_shard_names_read_the_same(served, tmp_path):
    root, _ = served
    old = tmp_path / "old"
    shutil.copytree(root / "media", old)
    d = json.loads((old / "manifest.json").read_text())
    del d["shard_names"]
    (old / "manifest.json").write_text(json.dumps(d))
    assert read_manifest(old).shard_names == read_manifest(root / "media").shard_names
    assert same(batches(old, "val", False), batches(root / "media", "val", False))
    (old / "train-000004.tar").unlink()  # the local check still applies to local directories
    with pytest.raises(ManifestError, match="lists 5 train shards but 4 exist"):
        read_manifest(old)


def test_the_evaluation_readers_read_a_url_like_the_directory(served):
    """What evaluate, sample and reconstruct read besides media_loader: whole splits (image pixels), whole audio clips
    and the manifest hash that ties samples to their data."""
    from helpers import tone_shards
    from pipelines.metrics.audio_eval import full_clips
    from pipelines.metrics.inputs import load_split
    root, base = served
    local = root / "media"
    for name, url in locations(root, base).items():
        for a, b in zip(load_split(str(local), "val"), load_split(url, "val")):
            assert torch.equal(a, b), name
    audio = tone_shards(root / "tones", per_class=2, rate=8_000, clip_seconds=0.25)
    for url in (f"{base}/{audio.relative_to(root).as_posix()}", f"pipe:cat {audio}/{{}}"):
        assert manifest_sha256(url) == manifest_sha256(audio)
        got, want = full_clips(url, "val"), full_clips(audio, "val")
        assert [c.key for c in got] == [c.key for c in want] and len(want) > 0
        assert all(torch.equal(g.x, w.x) and g.label == w.label for g, w in zip(got, want))
