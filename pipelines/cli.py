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


def command_name(main: Callable) -> str:
    """`pipelines.encode_shards` for the main of that module, also when it runs as `python -m` (as __main__)."""
    module = getattr(main, "__module__", None) or "command"
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else sys.argv[0]
    return module


def run(main: Callable[[T], Any], cls: type[T], argv: list[str] | None = None) -> Any:
    try:
        return main(parse_config(cls, argv))
    except UserError as e:
        message = " ".join(str(e).split())  # one line, even when a message was built from several
        print(f"{command_name(main)}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
