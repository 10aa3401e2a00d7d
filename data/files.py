"""Files written whole or not at all, and the file hash every manifest records.

Every writer in the repo goes through `atomic_path`: the bytes go to a hidden temp name in the target's directory
(`.{stem}.tmp-{pid}{suffix}`, the suffix kept so writers that infer a format from the name still work), which is
renamed onto the target only when the writer finished. A reader (a rerun, --resume, another process) therefore sees
the old file or the new one, never half of one; on an exception the temp file is removed. The rename is atomic
because the temp name lives in the same directory, hence on the same filesystem.

    write_text_atomic(path, text) / write_bytes_atomic(path, data) / write_json_atomic(path, obj)
    with atomic_path(path) as tmp:              # for writers that want a filename (np.savez, PIL, tarfile,
        np.savez(tmp, ...)                      # safetensors, a checkpoint directory: tmp.mkdir() first)

A process killed by SIGKILL cannot remove its temp file; `remove_stale_temps(path)` deletes those of `path` whose
writer process is gone (writers of big outputs, checkpoints, call it before writing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

TEMP_MARK = ".tmp-"  # in every temp name: what readers skip and cleanups look for


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_path(path: str | Path) -> Path:
    """The temp name `atomic_path` writes `path` under: hidden, per process, same directory and suffix."""
    path = Path(path)
    return path.with_name(f".{path.stem}{TEMP_MARK}{os.getpid()}{path.suffix}")


def remove_stale_temps(path: str | Path) -> list[Path]:
    """Delete the temp files/directories of `path` (`temp_path` names of any pid) whose writer is no longer running
    on this machine: what a SIGKILLed writer left behind. A live writer's temp (another pid still running) is kept.
    Returns what was removed."""
    path = Path(path)
    prefix, suffix = f".{path.stem}{TEMP_MARK}", path.suffix
    removed = []
    if not path.parent.is_dir():
        return removed
    for candidate in path.parent.iterdir():
        name = candidate.name
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        pid = name[len(prefix):len(name) - len(suffix)] if suffix else name[len(prefix):]
        if pid.isdigit() and 0 < int(pid) != os.getpid() and not _running(int(pid)):
            _remove(candidate)
            removed.append(candidate)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it onto `path` when the block exits cleanly, remove it otherwise.

    The temp path does not exist when yielded (a leftover of a killed process with the same pid is removed first).
    The writer may create a file or a directory there. A directory replaces an existing `path` directory: the old
    one is moved aside first (`.{name}.old-{pid}`) and deleted after the rename, so a crash between the two renames
    still leaves one complete copy on disk."""
    path = Path(path)
    tmp = temp_path(path)
    _remove(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"atomic_path: the writer created nothing at {tmp} (for {path})")
        if tmp.is_dir() and path.is_dir():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: never leave a temp file behind
        _remove(tmp)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: dict) -> None:
    """Indented, keys sorted, newline-terminated JSON (the format of every manifest)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
