"""The one timer every benchmark uses: untimed warm-up, the device synchronised around each timed call (CUDA kernels
run asynchronously: without it a timer measures the launch, not the work), and the peak CUDA memory of the calls.

    timing = time_call(step, device, repeats=10, warmup=3)      # timing.median, timing.peak_bytes
    timings = time_rows({"ours": f, "theirs": g}, device, repeats=3)

`time_rows` lets the rows take turns within each round, so a burst of load on a shared machine hits them all alike.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch


@dataclass
class Timing:
    seconds: list[float] = field(default_factory=list)  # wall time of each timed call
    start_bytes: int | None = None  # CUDA memory allocated when the timed calls began (None off CUDA)
    peak_bytes: int | None = None  # the most CUDA memory allocated during a timed call
    result: Any = None  # what the last call returned

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def added_bytes(self) -> int | None:
        """Peak memory above what was allocated before the calls (the calls' own working memory)."""
        return None if self.peak_bytes is None else self.peak_bytes - self.start_bytes


def sync(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rows(rows: Mapping[str, Callable[[], Any]], device: torch.device | str, repeats: int, warmup: int = 1,
              before: Callable[[], None] | None = None) -> dict[str, Timing]:
    """`warmup` untimed rounds, then `repeats` timed rounds of every row; `before()` runs untimed before each call."""
    cuda = torch.device(device).type == "cuda"
    timings = {name: Timing() for name in rows}
    for _ in range(warmup):
        for fn in rows.values():
            if before is not None:
                before()
            fn()
    sync(device)
    start = torch.cuda.memory_allocated(device) if cuda else None
    for _ in range(repeats):
        for name, fn in rows.items():
            if before is not None:
                before()
            sync(device)
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            result = fn()
            sync(device)
            t = timings[name]
            t.seconds.append(time.perf_counter() - t0)
            t.result = result
            if cuda:
                t.start_bytes = start
                t.peak_bytes = max(t.peak_bytes or 0, torch.cuda.max_memory_allocated(device))
    return timings


def time_call(fn: Callable[[], Any], device: torch.device | str = "cpu", repeats: int = 1, warmup: int = 0,
              before: Callable[[], None] | None = None) -> Timing:
    """One function timed like a row of `time_rows`; by default a single call and no warm-up (e.g. a whole run)."""
    return time_rows({"": fn}, device, repeats, warmup, before)[""]
