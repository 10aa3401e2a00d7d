"""Bootstrap intervals of the evaluation's numbers, and the rule that says when two presets differ.

    lo, hi = mean_interval(per_clip_pesq, resamples=200, seed=0)                  # a per-sample metric's mean
    ci = fidelity_intervals(gen_feats, ref_feats, "digits", kid_subset_size, prc_k, 200, 0, ("fid", "kid", "prc"))
    ci["fid_digits"]   # (lo, hi); also kid_<tag>, precision_<tag>, recall_<tag>, f_score_<tag>
    seed_interval([0.61, 0.58, 0.70], [(0.5, 0.7), (0.5, 0.66), (0.6, 0.8)])        # a row over several seeds
    disjoint(a, b)     # True only when two intervals do not overlap: the one test of "different"

Bootstrap over samples: the generated samples (their features, extracted once) or the per-clip scores are resampled
with replacement `resamples` times (seeded) against the fixed reference, and the metric is recomputed on each
resample. Resampling with replacement duplicates samples, which shrinks the generated set's spread and inflates FID
and KID; so the interval reported is the 2.5-97.5% percentile interval of the resampled values shifted by their bias
(their mean minus the estimate on all samples). For a mean the bias is ~0 and this is the plain percentile interval.

Everything is recomputed from precomputed pieces, so a resample costs no feature extraction and no sqrtm:
- FID: with A = S_ref^(1/2) (symmetric, by eigh), Tr (S_g S_ref)^(1/2) = Tr (A S_g A)^(1/2) = sum of the square roots
  of the eigenvalues of A S_g A, which equal those of the n x n Gram matrix of the centred (X A) rows when n < D.
- KID: the unbiased MMD^2 with torch-fidelity's kernel (x.y / D + 1)^3 on the whole resample (the quantity KID's
  random subsets estimate), from the kernel matrix of the generated set and each generated row's mean kernel
  against the reference, computed once.
- precision / recall (torch-fidelity's definitions, k-th neighbour radii counting a point itself): precision is a
  per-sample indicator (inside some reference ball) and resamples as a mean; recall needs the generated radii of each
  resample, from the generated set's distance matrix computed once.
The cost is O(resamples x n^2) for n generated samples, and memory O(n^2).

Seeds: a row run with several seeds gets the interval `seed_interval`: the hull of mean +- 2 standard errors over the
seeds and of every seed's own bootstrap interval (where there is one). Two rows differ (in one metric) only when their
intervals are disjoint; a row with neither several seeds nor a bootstrap interval has no interval and never differs.
"""
from __future__ import annotations

import math

import numpy as np
import torch

LEVEL = 0.95  # the intervals' nominal coverage


def resample_counts(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) int: how often each of n samples is drawn in each resample (n draws with replacement)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    return np.stack([np.bincount(row, minlength=n) for row in idx])


def shifted_percentile(estimate: float, values: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap `values`, shifted by their bias (mean - estimate)."""
    values = np.asarray(values, dtype=np.float64)
    bias = float(values.mean()) - estimate
    lo, hi = np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(lo) - bias, float(hi) - bias


def mean_interval(values, resamples: int, seed: int) -> tuple[float, float] | None:
    """95% bootstrap interval of the mean of per-sample `values` (None below 2 values)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) < 2 or resamples < 1:
        return None
    counts = resample_counts(len(v), resamples, seed)
    return shifted_percentile(float(v.mean()), counts @ v / len(v))


def interval_metrics(name: str, interval: tuple[float, float] | None) -> dict[str, float]:
    """How an interval is written into metrics.json: `<name>/ci95_lo` and `<name>/ci95_hi` (none when None)."""
    return {} if interval is None else {f"{name}/ci95_lo": interval[0], f"{name}/ci95_hi": interval[1]}


def read_interval(metrics: dict, name: str) -> tuple[float, float] | None:
    """The interval `interval_metrics` wrote for `name`, or None."""
    lo, hi = metrics.get(f"{name}/ci95_lo"), metrics.get(f"{name}/ci95_hi")
    return None if lo is None or hi is None else (lo, hi)


# ---------------------------------------------------------------------------------------------- features
def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def bootstrap_fid(gen: np.ndarray, ref: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """FID of each resample (rows of `counts`) of `gen` against the whole of `ref`, in float64."""
    x, r = np.asarray(gen, np.float64), np.asarray(ref, np.float64)
    n, d = x.shape
    mu_r, s_r = r.mean(0), np.cov(r, rowvar=False).reshape(d, d)
    a = _sqrt_psd(s_r)
    z = x @ a
    out = np.empty(len(counts))
    for b, c in enumerate(counts):
        w = c / n
        mu = w @ x
        xc = x - mu
        trace_g = float(c @ (xc * xc).sum(1)) / (n - 1)
        zc = (z - w @ z) * np.sqrt(c)[:, None]  # rows weighted by multiplicity: zc.T zc = sum_i c_i z_i z_i^T
        keep = c > 0
        zc = zc[keep]
        gram = zc @ zc.T if len(zc) < d else zc.T @ zc
        root = np.sqrt(np.clip(np.linalg.eigvalsh(gram / (n - 1)), 0, None)).sum()
        diff = mu - mu_r
        out[b] = diff @ diff + trace_g + np.trace(s_r) - 2 * root
    return out


def _kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1) ** 3  # torch-fidelity's KID kernel


def bootstrap_kid(gen: np.ndarray, ref: np.ndarray, counts: np.ndarray, block: int = 2048) -> np.ndarray:
    """Unbiased MMD^2 of each resample of `gen` against the whole of `ref` (torch-fidelity's polynomial kernel)."""
    x, r = np.asarray(gen, np.float64), np.asarray(ref, np.float64)
    n, m = len(x), len(r)
    k_rr = sum(float(_kernel(r[i:i + block], r).sum()) for i in range(0, m, block))
    diag_r = float(((np.einsum("ij,ij->i", r, r) / r.shape[1] + 1) ** 3).sum())
    term_rr = (k_rr - diag_r) / (m * (m - 1))
    k_gg = _kernel(x, x)
    diag_g = np.diagonal(k_gg)
    row_gr = np.concatenate([_kernel(x[i:i + block], r).mean(1) for i in range(0, n, block)])
    c = counts.astype(np.float64)
    pairs = ((c @ k_gg) * c).sum(1) - c @ diag_g
    return pairs / (n * (n - 1)) + term_rr - 2 * (c @ row_gr) / n


def bootstrap_prc(gen: np.ndarray, ref: np.ndarray, counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(precision, recall) of each resample of `gen` against `ref`, torch-fidelity's definitions with neighbourhood k
    (generated = input 1, real = input 2)."""
    x, r = torch.from_numpy(np.asarray(gen, np.float32)), torch.from_numpy(np.asarray(ref, np.float32))
    d_gg, d_rg = torch.cdist(x, x), torch.cdist(r, x)
    radius_r = torch.cdist(r, r).kthvalue(k + 1).values
    inside = (d_rg <= radius_r[:, None]).any(0).double().numpy()  # generated i inside some reference ball
    precision = counts @ inside / len(x)
    recall = np.empty(len(counts))
    for b, c in enumerate(counts):
        drawn = np.nonzero(c)[0]
        # a drawn point's distances to the resample: its row over the drawn points, each repeated c times
        rows = d_gg[drawn][:, drawn].repeat_interleave(torch.from_numpy(c[drawn]), dim=1)
        radius = rows.kthvalue(k + 1, dim=1).values
        recall[b] = float((d_rg[:, drawn] <= radius).any(1).double().mean())
    return precision, recall


def fidelity_intervals(gen: np.ndarray, ref: np.ndarray, tag: str, kid_subset_size: int, prc_neighborhood: int,
                       resamples: int, seed: int, metrics: tuple[str, ...], estimates: dict[str, float]
                       ) -> dict[str, tuple[float, float]]:
    """95% bootstrap intervals, resampling the generated features, of the metrics in `estimates` (the values on all
    samples, named <metric>_<tag>): fid, kid (only where KID was computed), precision, recall, f_score."""
    if resamples < 1 or len(gen) < 2:
        return {}
    counts = resample_counts(len(gen), resamples, seed)
    values: dict[str, np.ndarray] = {}
    if "fid" in metrics:
        values[f"fid_{tag}"] = bootstrap_fid(gen, ref, counts)
    if "kid" in metrics and kid_subset_size:
        values[f"kid_{tag}"] = bootstrap_kid(gen, ref, counts)
    if "prc" in metrics:
        p, r = bootstrap_prc(gen, ref, counts, prc_neighborhood)
        values.update({f"precision_{tag}": p, f"recall_{tag}": r,
                       f"f_score_{tag}": 2 * p * r / np.maximum(1e-5, p + r)})
    return {name: shifted_percentile(estimates[name], v) for name, v in values.items() if name in estimates}


# ---------------------------------------------------------------------------------------------- seeds and rows
def seed_interval(values: list[float], boot: list[tuple[float, float] | None]) -> tuple[float, float] | None:
    """A row's interval over its seeds: the hull of mean +- 2 standard errors (2+ seeds) and of the seeds' bootstrap
    intervals; None when there is neither."""
    parts = [b for b in boot if b is not None]
    if len(values) >= 2:
        mean, sem = float(np.mean(values)), float(np.std(values, ddof=1)) / math.sqrt(len(values))
        parts.append((mean - 2 * sem, mean + 2 * sem))
    if not parts:
        return None
    return min(p[0] for p in parts), max(p[1] for p in parts)


def disjoint(a: tuple[float, float] | None, b: tuple[float, float] | None) -> bool:
    """Two intervals that do not overlap; never true when either is missing."""
    return a is not None and b is not None and (a[1] < b[0] or b[1] < a[0])
