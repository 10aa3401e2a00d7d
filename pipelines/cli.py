"""How every stage runs from the command line: `if __name__ == "__main__": run(main, XConfig)`.

`run` parses the typed config (pipelines/config.py) and calls `main(cfg)`. A user's mistake (`data.errors.UserError`:
a config typo, a missing or unfinished input directory, mismatched checkpoints) prints one line naming the input and
the fix, and exits with status 2, without a traceback; a bug (any other exception) still shows its traceback.
Calling `main(cfg)` from Python raises the UserError as usual.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, TypeVar

from data.errors import UserError
from pipelines.config import parse_config

T = TypeVar("T")


def run(main: Callable[[T], Any], cls: type[T], argv: list[str] | None = None) -> Any:
    try:
        return main(parse_config(cls, argv))
    except UserError as e:
        prog = getattr(main, "__module__", "") or "command"
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
