"""Codebook health: utilisation, perplexity and dead codes over a window (an epoch or an eval pass)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


class CodebookUsage:
    """Accumulates code counts with bincount. Utilisation = fraction of the K codes used at least once in the window."""

    def __init__(self, num_codes: int, device: torch.device | str = "cpu"):
        self.num_codes = num_codes
        self.counts = torch.zeros(num_codes, dtype=torch.long, device=device)

    def update(self, codes: Tensor) -> None:
        codes = codes.detach().reshape(-1).to(self.counts.device)
        self.counts += torch.bincount(codes, minlength=self.num_codes)

    def reset(self) -> None:
        self.counts.zero_()

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def used(self) -> int:
        return int((self.counts > 0).sum())

    @property
    def dead(self) -> int:
        return self.num_codes - self.used

    @property
    def utilisation(self) -> float:
        return self.used / self.num_codes

    @property
    def perplexity(self) -> float:
        """exp(entropy) of the code distribution: K when uniform, 1 when a single code is used."""
        total = self.total
        if total == 0:
            return 0.0
        p = self.counts[self.counts > 0].double() / total
        return math.exp(float(-(p * p.log()).sum()))

    def summary(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}utilisation": self.utilisation, f"{prefix}perplexity": self.perplexity,
                f"{prefix}dead_codes": float(self.dead)}
