"""A user's mistake ends a command with one line and status 2; a bug keeps its traceback."""
from dataclasses import dataclass
from pathlib import Path

import pytest

from data.errors import UserError
from pipelines.cli import run


@dataclass
class Cfg:
    path: str = ""  # an input
    bug: bool = False  # raise a non-user error


def main(cfg: Cfg) -> str:
    if cfg.bug:
        raise ZeroDivisionError("a bug")
    if not Path(cfg.path).exists():
        raise UserError(f"--path={cfg.path} does not exist: pass an existing file")
    return cfg.path


def test_user_error_is_one_line_and_status_2(capsys, tmp_path):
    assert run(main, Cfg, [f"--path={tmp_path}"]) == str(tmp_path)
    with pytest.raises(SystemExit) as e:
        run(main, Cfg, ["--path=/nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"{__name__}: error: --path=/nope does not exist: pass an existing file"]
    with pytest.raises(SystemExit) as e:  # a config typo is a user error too
        run(main, Cfg, ["--pth=x"])
    assert e.value.code == 2 and "unknown config key pth" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):  # a bug is not caught
        run(main, Cfg, ["--bug"])


def test_stage_commands_report_user_errors_in_one_line(tmp_path, digits_shards):
    """Real stages as a person runs them: each mistake exits with status 2 and one line naming the input."""
    import os
    import subprocess
    import sys
    empty, a_file = tmp_path / "empty", tmp_path / "a_file.txt"
    empty.mkdir()
    a_file.write_text("not a folder")
    cases = {  # argv -> what the one line must name
        ("pipelines.encode_shards", f"--data={empty}", f"--tokenizer={tmp_path}", f"--out={tmp_path / 'tokens'}"):
            str(empty),
        ("pipelines.train_prior", f"--tokens={tmp_path / 'no_tokens'}", f"--out={tmp_path / 'prior'}"):
            str(tmp_path / "no_tokens"),
        ("pipelines.train_tokenizer", "--loop.stepz=5"): "loop.stepz",
        ("pipelines.train_tokenizer", f"--data={a_file}", f"--out={tmp_path / 'tok'}"): str(a_file),
        ("pipelines.train_tokenizer", f"--data={empty}", "--model.quantizer=simvqq", f"--out={tmp_path / 'tok'}"):
            "simvqq",
        ("pipelines.sample",): "missing required setting --prior, --tokenizer, --out",
        ("pipelines.train_tokenizer", f"--data={digits_shards}", "--model.dims=1", f"--out={tmp_path / 'tok'}"):
            "--model.dims=2",  # a 1-D (audio) tokenizer on image shards: the fix names the setting
        ("pipelines.encode_shards", f"--data={digits_shards}", f"--tokenizer={a_file}", f"--out={tmp_path / 'tokens'}"):
            f"no checkpoint at {a_file}",
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {argv: subprocess.Popen([sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env) for argv in cases}
    for argv, named in cases.items():
        _, err = procs[argv].communicate(timeout=300)
        assert procs[argv].returncode == 2, (argv, err)
        assert "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{argv[0]}: error: ") and named in lines[0], (argv, err)
    for out in ("tokens", "prior", "tok"):
        assert not (tmp_path / out).exists(), out  # refused before writing anything
