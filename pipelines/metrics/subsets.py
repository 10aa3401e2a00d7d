"""Seeded, class-stratified subsets for limited comparisons (`max_reference`, `inception_limit` in evaluate).

Samples are written class by class and shards of a class-sorted folder are too, so a prefix of either would compare
different class mixtures; a stratified random subset keeps the population's mixture.
"""
from __future__ import annotations

import torch


def stratified_subset(labels: torch.Tensor, n: int | None, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded random subset of exactly min(n, N) of the N items (all of them when n is 0/None).

    Each label value is a stratum that gets its share of n in proportion to its share of the population (largest
    remainder rounding), so a subset has the population's class mixture; unlabelled data (-1 everywhere) is one
    stratum, i.e. a plain random subset. The same labels and seed give the same indices.
    """
    labels = torch.as_tensor(labels)
    total = len(labels)
    if not n or n >= total:
        return torch.arange(total)
    g = torch.Generator().manual_seed(seed)
    classes, counts = labels.unique(return_counts=True)
    quota = counts.double() * n / total
    take = quota.floor().long()
    leftover = n - int(take.sum())  # < number of classes; the largest fractional parts get one more each
    take[torch.argsort(quota - take, descending=True, stable=True)[:leftover]] += 1
    picks = []
    for c, k in zip(classes, take.tolist()):
        members = (labels == c).nonzero().flatten()
        picks.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(picks).sort().values


def class_counts(labels: torch.Tensor, class_names: list[str]) -> dict:
    """{"count": N} plus {"per_class": {name: count}} when the items are labelled."""
    out: dict = {"count": len(labels)}
    if class_names and len(labels) and (labels >= 0).all():
        out["per_class"] = dict(zip(class_names, torch.bincount(labels, minlength=len(class_names)).tolist()))
    return out
