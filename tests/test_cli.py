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
