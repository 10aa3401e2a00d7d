"""data/files.py: every writer of the repo goes through atomic_path, so a reader sees the old file or the new one,
never half of one, and no temp file outlives its writer (an exception, Ctrl-C)."""
import hashlib
import json

import numpy as np
import pytest
import torch

from data.files import (TEMP_MARK, atomic_path, sha256_file, temp_path, write_bytes_atomic, write_json_atomic,
                        write_text_atomic)
from data.shards import AtomicTar, iter_shard_samples
from pipelines.checkpoint import load_checkpoint, save_checkpoint


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if TEMP_MARK in p.name or ".old-" in p.name)


def test_writers_write_whole_files_and_leave_no_temp(tmp_path):
    write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_text_atomic(tmp_path / "a.txt", "first")
    write_text_atomic(tmp_path / "a.txt", "second")  # replaces
    write_json_atomic(tmp_path / "m.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01" and (tmp_path / "a.txt").read_text() == "second"
    # the manifest format: indented, keys sorted, newline-terminated (token and media manifests are byte-stable)
    assert (tmp_path / "m.json").read_text() == json.dumps({"a": [1, 2], "b": 1}, indent=2) + "\n"
    assert leftovers(tmp_path) == []
    assert sha256_file(tmp_path / "a.bin") == hashlib.sha256(b"\x00\x01").hexdigest()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_mid_write_keeps_the_old_file_and_removes_the_temp(tmp_path, error):
    target = tmp_path / "report.txt"
    target.write_text("old, complete")
    with pytest.raises(error):
        with atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write("new, half")
                f.flush()
                assert tmp.read_text() == "new, half" and target.read_text() == "old, complete"
                raise error()
    assert target.read_text() == "old, complete" and leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):  # no earlier file: none afterwards either
        with atomic_path(tmp_path / "new.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError
    assert not (tmp_path / "new.txt").exists() and leftovers(tmp_path) == []


def test_temp_name_keeps_the_suffix_for_writers_that_infer_the_format(tmp_path):
    assert temp_path(tmp_path / "ref.npz").suffix == ".npz" and temp_path(tmp_path / "ref.npz").name[0] == "."
    with atomic_path(tmp_path / "ref.npz") as tmp:
        np.savez(tmp, x=np.arange(3))  # np.savez appends ".npz" to a name without it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npz"]
    with np.load(tmp_path / "ref.npz") as z:
        assert z["x"].tolist() == [0, 1, 2]


def test_a_directory_replaces_a_directory_and_a_failed_one_changes_nothing(tmp_path):
    target = tmp_path / "step-1"
    for text in ("v1", "v2"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text(text)
    assert (target / "f").read_text() == "v2" and leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text("v3, half")
            raise RuntimeError
    assert (target / "f").read_text() == "v2" and leftovers(tmp_path) == []


def test_a_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="created nothing"):
        with atomic_path(tmp_path / "x"):
            pass


def test_atomic_tar_interrupted_keeps_the_old_shard(tmp_path):
    path = tmp_path / "train-000000.tar"
    with AtomicTar(path) as tar:
        tar.add("a", {"cls": b"1"})
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with AtomicTar(path) as tar:
            tar.add("b", {"cls": b"2"})
            raise RuntimeError
    assert path.read_bytes() == before and [k for k, _ in iter_shard_samples(path)] == ["a"]
    assert leftovers(tmp_path) == []


def test_checkpoint_interrupted_keeps_the_previous_one(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step-000000001"
    save_checkpoint(ckpt, config={"kind": "test"}, weights={"model": {"w": torch.ones(2)}}, state={"step": 1})
    with pytest.raises(Exception):  # torch.save cannot pickle a lambda: fails after the safetensors were written
        save_checkpoint(ckpt, config={"kind": "test"}, weights={"model": {"w": torch.zeros(2)}},
                        state={"step": lambda: 2})
    _, weights = load_checkpoint(ckpt)
    assert weights["model"]["w"].tolist() == [1.0, 1.0] and leftovers(ckpt.parent) == []
    save_checkpoint(ckpt, config={"kind": "test"}, weights={"model": {"w": torch.zeros(2)}})  # replaces it whole
    _, weights = load_checkpoint(ckpt)
    assert weights["model"]["w"].tolist() == [0.0, 0.0] and not (ckpt / "state.pt").exists()
    assert leftovers(ckpt.parent) == []
