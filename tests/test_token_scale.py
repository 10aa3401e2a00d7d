"""Token splits at scale: the training loader reads one memory-mapped copy of a split (built once, shared by every
process through the page cache) and gives exactly the batches of the in-memory path."""
from __future__ import annotations

import mmap
import os

import numpy as np
import pytest
import torch

from data.shards import ManifestError, shard_name
from data.tokens import TokenLoader, load_tokens, open_tokens, token_loader
from pipelines import train_prior
from pipelines.config import parse_config

from test_token_shards import write_split
from test_train_prior import TINY as PRIOR_TINY
from test_train_prior import write_tokens


def entry_of(tokens) -> str:
    return os.path.dirname(tokens.codes.filename)


def mapped(array: np.ndarray) -> bool:
    """A read-only view of a file mapping (np.load(mmap_mode="r")), not an array in the process's own memory."""
    return isinstance(array, np.memmap) and isinstance(array._mmap, mmap.mmap) and not array.flags.writeable


@pytest.mark.parametrize("num_codes", [200, 1_024, 70_000])  # stored as uint8, uint16, int32
def test_the_loader_maps_the_split_and_gives_the_in_memory_batches(tmp_path, num_codes):
    write_split(tmp_path, num_codes, n=22, seed=num_codes)  # 6 shards of at most 4
    memory = load_tokens(tmp_path, "train")
    tokens = open_tokens(tmp_path, "train")
    assert mapped(tokens.codes) and mapped(tokens.labels) and tokens.keys is None
    assert entry_of(tokens).startswith(str(tmp_path / "cache" / "train-"))
    assert tokens.codes.dtype == memory.codes.dtype and np.array_equal(tokens.codes, memory.codes)
    assert np.array_equal(tokens.labels, memory.labels)
    for kw in (dict(shuffle=True, seed=1, epoch=3), dict(shuffle=True, seed=1, epoch=3, skip_batches=2),
               dict(shuffle=True, seed=2, epoch=0, rank=1, world_size=2), dict(shuffle=False, rank=0, world_size=3),
               dict(shuffle=False)):
        got = list(token_loader(tmp_path, "train", 4, **kw))
        expected = list(TokenLoader(memory, 4, **kw))
        assert len(got) == len(expected) > 0, kw
        for a, b in zip(got, expected):
            assert a.tokens.dtype == torch.long and torch.equal(a.tokens, b.tokens) and torch.equal(a.labels, b.labels)


def test_the_cache_is_built_once_and_follows_the_shards(tmp_path):
    write_split(tmp_path, 1_024, n=22)
    first = open_tokens(tmp_path, "train")
    files = {name: os.stat(os.path.join(entry_of(first), name)) for name in ("codes.npy", "labels.npy")}
    again = open_tokens(tmp_path, "train")  # another process, or the next run: the same files, not rebuilt
    assert entry_of(again) == entry_of(first)
    assert all((os.stat(os.path.join(entry_of(again), n)).st_ino, os.stat(os.path.join(entry_of(again), n))
                .st_mtime_ns) == (s.st_ino, s.st_mtime_ns) for n, s in files.items())
    # re-encoded tokens with the very same manifest (another device, say): a new entry, the stale one is gone
    codes, _, _ = write_split(tmp_path, 1_024, n=22, seed=7)
    rebuilt = open_tokens(tmp_path, "train")
    assert entry_of(rebuilt) != entry_of(first) and not os.path.exists(entry_of(first))
    assert np.array_equal(rebuilt.codes.astype(np.int64), codes.reshape(22, -1))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [os.path.basename(entry_of(rebuilt))]


def test_a_url_split_is_cached_where_told_and_an_empty_split_maps(tmp_path):
    (tmp_path / "t").mkdir()
    write_split(tmp_path / "t", 300, n=10)
    url = f"pipe:cat {tmp_path / 't'}/{{}}"
    tokens = open_tokens(url, "train", cache_dir=tmp_path / "c")
    assert mapped(tokens.codes) and entry_of(tokens).startswith(str(tmp_path / "c" / "train-"))
    assert np.array_equal(tokens.codes, load_tokens(tmp_path / "t", "train").codes)
    assert not (tmp_path / "t" / "cache").exists()
    empty = open_tokens(tmp_path / "t", "val")  # a split the manifest does not list: 0 rows, same shapes
    assert empty.codes.shape == (0, 12) and len(TokenLoader(empty, 4, shuffle=False)) == 0


def test_a_miscounted_split_is_refused_and_leaves_no_cache(tmp_path):
    write_split(tmp_path, 1_024, n=10)
    manifest = (tmp_path / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(manifest.replace('"train": 10', '"train": 11'))
    with pytest.raises(ManifestError, match="10 train samples in the shards, the manifest says 11"):
        open_tokens(tmp_path, "train")
    assert not [p for p in (tmp_path / "cache").iterdir()]  # neither an entry nor a temp directory


def test_train_prior_trains_on_the_mapped_split(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    write_tokens(tokens)
    train_prior.main(parse_config(train_prior.TrainPriorConfig, PRIOR_TINY + [
        f"--tokens={tokens}", f"--out={tmp_path / 'run'}", "--loop.steps=1", "--loop.eval_every=1"]))
    assert sorted(p.name.split("-")[0] for p in (tokens / "cache").iterdir()) == ["train", "val"]
    assert (tokens / shard_name("train", 0)).is_file()  # the shards stay what they were
