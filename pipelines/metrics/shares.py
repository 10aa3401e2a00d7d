"""Evaluation over several processes (`accelerate launch -m pipelines.evaluate ...`): every process reads and computes
on its share of a set, and the rows it computed come back in the set's one-process order.

    share = split_share("runs/d/shards", "train", acc)       # this process's shards of the split, all its labels
    feats = map_rows(lambda x: classifier_outputs(clf, x)[0], share, acc)   # (N, D) on every process, set order

A set has one order, the one a single process reads it in (pipelines/metrics/inputs.py). Sample files are read one by
one: process r of P takes items r, r + P, ... (`samples_share`). A split is read in whole shards, so a shard gives
the batches of a one-process run: process r takes shards r, r + P, ... (`split_share`), and `place` turns the
(shard, labels) it read into its items' positions in the whole split, giving every process the labels of all.
`gather_rows` puts every process's per-item rows (features, logits, per-pair distances) back in the set's order, so
what is computed from them (FID, KID's seeded subsets, precision/recall, stratified subsets, means) is the
one-process value up to the rounding of batched forwards.

`acc` is the stage's accelerate.Accelerator, or None for one process.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from data.shards import read_manifest
from pipelines.metrics.inputs import read_samples, read_shards, sample_labels, sample_manifest


@dataclass
class Share:
    """One process's part of a set of N items."""
    x: torch.Tensor  # (n, ...) the items this process holds, in the set's order
    positions: torch.Tensor  # (n,) their indices in the set, increasing
    labels: torch.Tensor  # (N,) the labels of the whole set, on every process

    @classmethod
    def whole(cls, x: torch.Tensor, labels: torch.Tensor) -> Share:
        """A set one process holds whole."""
        return cls(x, torch.arange(len(labels)), torch.as_tensor(labels))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, keep: torch.Tensor) -> Share:
        """This process's part of the subset `keep` (sorted indices into the set, e.g. a stratified_subset), with
        positions renumbered into the subset."""
        keep = torch.as_tensor(keep, dtype=torch.long)
        inside = torch.isin(self.positions, keep)
        return Share(self.x[inside], torch.searchsorted(keep, self.positions[inside]), self.labels[keep])


def process(acc) -> tuple[int, int]:
    """(this process's index, the number of processes)."""
    return (0, 1) if acc is None else (acc.process_index, acc.num_processes)


def gather_objects(objects: list, acc) -> list:
    """Every process's `objects`, concatenated in process order, on every process."""
    from accelerate.utils import gather_object
    return objects if acc is None or acc.num_processes == 1 else gather_object(objects)


def broadcast(value: Any, acc) -> Any:
    """The main process's `value` on every process."""
    from accelerate.utils import broadcast_object_list
    return value if acc is None or acc.num_processes == 1 else broadcast_object_list([value])[0]


def reduce_sum(t: torch.Tensor, acc) -> torch.Tensor:
    """The sum of every process's `t` (e.g. code counts), on every process, on t's device."""
    return t if acc is None or acc.num_processes == 1 else acc.reduce(t.to(acc.device), "sum").to(t.device)


def gather_rows(positions: torch.Tensor, rows: torch.Tensor | None, acc) -> torch.Tensor:
    """rows[i] belongs to item positions[i] of a set (None: this process holds no items) -> the rows of every
    process, (N, ...) in the set's order, on every process."""
    parts = gather_objects([] if rows is None else [(positions.cpu(), rows.cpu())], acc)
    if not parts:
        raise ValueError("shares: no process holds any item of the set")
    where = torch.cat([p for p, _ in parts])
    order = torch.argsort(where)
    if not torch.equal(where[order], torch.arange(len(where))):  # each item exactly once: a bug otherwise
        raise RuntimeError(f"shares: the processes' positions do not cover the set once ({len(where)} rows)")
    return torch.cat([r for _, r in parts])[order]


def map_rows(fn: Callable[[torch.Tensor], torch.Tensor], share: Share, acc) -> torch.Tensor:
    """fn (items -> one row per item) on every process's items, gathered in the set's order on every process."""
    return gather_rows(share.positions, fn(share.x) if len(share.positions) else None, acc)


def place(parts: list[tuple[int, torch.Tensor]], acc) -> tuple[torch.Tensor, torch.Tensor]:
    """(shard index, labels) of the batches this process read (a shard's batches consecutive and in file order) ->
    (their items' positions in the whole split, the labels of the whole split), the split being its shards in index
    order. Every process must call it (the labels are exchanged)."""
    per_shard: dict[int, list[torch.Tensor]] = {}
    for shard, labels in gather_objects([(shard, labels.cpu()) for shard, labels in parts], acc):
        per_shard.setdefault(shard, []).append(labels)
    counts = {shard: sum(len(y) for y in ys) for shard, ys in per_shard.items()}
    offset, start = {}, 0
    for shard in sorted(counts):
        offset[shard], start = start, start + counts[shard]
    positions, seen = [], {}
    for shard, labels in parts:
        first = offset[shard] + seen.get(shard, 0)
        positions.append(torch.arange(first, first + len(labels)))
        seen[shard] = seen.get(shard, 0) + len(labels)
    labels = torch.cat([torch.cat(per_shard[shard]) for shard in sorted(per_shard)]) if per_shard else \
        torch.zeros(0, dtype=torch.long)
    return (torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long)), labels


def my_shards(data: str | Path, split: str, acc) -> range:
    """The indices of the split's shards this process reads: r, r + P, ..."""
    rank, count = process(acc)
    return range(rank, len(read_manifest(data).shard_names.get(split, [])), count)


def split_share(data: str | Path, split: str, acc) -> Share:
    """This process's shards of a split as the integers its files store (uint8 (n, 3, H, W) | int16 (n, 1, T)), and
    the labels of the whole split."""
    parts = read_shards(data, split, my_shards(data, split, acc))
    positions, labels = place([(shard, y) for shard, _, y in parts], acc)
    x = torch.cat([x for _, x, _ in parts]) if parts else torch.zeros(0, dtype=torch.uint8)
    return Share(x, positions, labels)


def samples_share(samples_dir: str | Path, data_manifest_sha: str, acc) -> tuple[Share, dict]:
    """(this process's sample files r, r + P, ... of a sample manifest, stacked, with the labels of all; the
    manifest), refusing samples whose tokens came from another dataset."""
    manifest, items = sample_manifest(samples_dir, data_manifest_sha)
    rank, count = process(acc)
    positions = torch.arange(rank, len(items), count)
    x = read_samples(samples_dir, manifest, [items[i] for i in positions]) if len(positions) else torch.zeros(0)
    return Share(x, positions, sample_labels(items)), manifest
