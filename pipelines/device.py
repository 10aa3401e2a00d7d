"""The one home of the `device = "auto"` setting every stage and benchmark takes."""
from __future__ import annotations

import torch

from pipelines.config import ConfigError


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> this process's GPU when CUDA is available, else the CPU; "cuda" -> this process's GPU (`local_rank`
    under a launcher); anything else ("cpu", "cuda:1", "mps") is taken as written."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        return torch.device("cuda", local_rank)
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device={name!r} is not a device ({e}); use auto, cpu, cuda or cuda:N") from None
