"""make_shards killed with SIGKILL mid-run, then run again without --overwrite: exactly the shards of an uninterrupted
run, byte for byte, and nothing else (no temp file, no shard of the killed run that the new run does not write)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from data.files import TEMP_MARK
from data.shards import read_manifest
from pipelines import make_shards
from pipelines.config import parse_config

ROOT = Path(__file__).resolve().parents[1]


def command(out: Path, max_count: int) -> list[str]:
    return ["--source=digits", f"--out={out}", f"--shard_max_count={max_count}"]


def kill_when(out: Path, shard: str, max_count: int) -> None:
    """Start `python -m pipelines.make_shards` and SIGKILL it as soon as `shard` exists (the run is then mid-way)."""
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.make_shards", *command(out, max_count)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not (out / shard).exists():
            time.sleep(0.005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "make_shards finished before it could be killed"
    assert not (out / "manifest.json").exists()


def finish(out: Path, max_count: int) -> None:
    done = subprocess.run([sys.executable, "-m", "pipelines.make_shards", *command(out, max_count)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_a_killed_run_reruns_to_the_bytes_of_an_uninterrupted_one(tmp_path):
    # uninterrupted, in this process: 33 train + 4 val shards and the manifest
    make_shards.main(parse_config(make_shards.MakeShardsConfig, command(tmp_path / "reference", 50)))
    reference = files(tmp_path / "reference")
    assert len(reference) == 38

    # killed while writing its first shards; the same command again (no --overwrite: the kill left no manifest)
    same = tmp_path / "same"
    kill_when(same, "train-000000.tar", 50)
    finish(same, 50)
    assert files(same) == reference

    # killed with 41 of its 81 train shards of 20 written, then rerun at 50 a shard: the killed run's shards 33..40
    # and temp files are gone, and so are planted temp files of another dead writer
    other = tmp_path / "other"
    kill_when(other, "train-000040.tar", 20)
    (other / f".val-000002{TEMP_MARK}99999999.tar").write_bytes(b"half a shard")
    (other / f".manifest{TEMP_MARK}99999999.json").write_text("{")
    assert len(list(other.glob("train-*.tar"))) > 33
    finish(other, 50)
    assert files(other) == reference and not list(other.glob(f"*{TEMP_MARK}*"))
    assert read_manifest(other).shard_names["train"][-1] == "train-000032.tar"
