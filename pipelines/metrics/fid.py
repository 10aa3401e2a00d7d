"""FID, KID and precision/recall between two image sets, offline, with the feature extractor named in every metric.

    ext = inception_extractor("weights/pt_inception-2015-12-05.pth")     # or extractors.classifier_extractor(ckpt)
    res = compute_fidelity(generated, reference, ext, FidelityConfig(), reference_id=manifest_sha + ":val:n=500")
    res.metrics  # {"fid_inception": .., "kid_inception": .., "kid_std_inception": .., "precision_inception": .., ...}

Images are uint8 (N, 3, H, W) tensors or iterables of uint8 (3, H, W) / (B, 3, H, W) tensors;
`data.media.to_uint8` converts the models' [-1, 1] floats. Features come from torch-fidelity's own extractor
machinery (its registry, `create_feature_extractor`, `get_featuresdict_from_dataset` — the code `calculate_metrics`
runs), so an extractor is anything registered with `torch_fidelity.register_feature_extractor`.
`"inception-v3-compat"` gets its weights from a local file (`python -m pipelines.weights inception`); nothing is ever
downloaded.

Why not call `calculate_metrics` for everything: its cache unpickles files (torch.load(weights_only=False)) and is
keyed by a name only, and it cannot take precomputed features. Here the reference features are cached as .npz
(loaded with allow_pickle=False) under `cache_dir`, keyed by sha256 of (reference_id, extractor name, weights sha256,
resize protocol); the file also records those fields and is refused if they disagree. `reference_id` is the caller's
identity for the exact reference pixels (e.g. media manifest sha256 + split + crop size + count); without it nothing
is cached. KID and precision/recall reuse the cached features through torch-fidelity's own metric functions; FID is
`frechet_distance` below (float64, scipy sqrtm). `torch_fidelity_metrics` runs the same comparison through
`calculate_metrics` end to end, as a cross-check (see tests/test_fid.py). `fidelity_of_shares` is compute_fidelity
over several processes: each extracts the features of its share of the sets (pipelines/metrics/shares.py), the main
process computes the metrics and alone reads and writes the cache.

Small sets: FID needs >= 2 images per side (a covariance); the precision/recall neighbourhood becomes
min(k, n1 - 1, n2 - 1). KID's subsets hold min(kid_subset_size, min(n1, n2) // 2) images: a subset as large as a
whole set is the same set every time, and the reported spread would be ~0 whatever the data. Below KID_MIN_IMAGES
images on a side no KID is reported; `FidelityResult.notes` says why. Values from few images are noisy, not wrong.

Intervals: with `bootstrap` > 0, `FidelityResult.intervals` holds a 95% bootstrap interval of each metric, resampling
the generated features (already extracted) against the fixed reference (pipelines/metrics/intervals.py).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import scipy.linalg
import torch
from torch.utils.data import Dataset

from data.errors import UserError
from data.files import atomic_path, sha256_file
from pipelines.metrics.inception_weights import DEFAULT_INCEPTION_PATH, inception_command
from pipelines.metrics.intervals import fidelity_intervals
from pipelines.metrics.shares import Share, broadcast, map_rows

INCEPTION = "inception-v3-compat"  # torch-fidelity's name for the TF-2015 FID Inception
# The media whose samples the feature extractors (Inception, the domain classifier) and LPIPS take: RGB pictures,
# uint8 (N, 3, H, W). evaluate skips them, with a note, for any other modality (audio gets its metrics later).
FIDELITY_MODALITIES = ("image",)
CACHE_VERSION = 1
# KID needs subsets that differ from each other: with half of the smaller set per subset, fewer than 10 images would
# mean subsets of < 5, whose mean and spread say little.
KID_MIN_IMAGES = 10


class MissingWeights(UserError, FileNotFoundError):
    """A feature extractor's weights file that is not on disk (nothing is downloaded at run time)."""


@dataclass(frozen=True)
class Extractor:
    name: str          # torch-fidelity registry name
    tag: str           # metric-name suffix: fid_<tag>, kid_<tag>, ...
    weights_path: str  # handed to the extractor as torch-fidelity's `feature_extractor_weights_path`
    weights_hash: str  # sha256 identifying those weights (part of the cache key)
    protocol: str      # how uint8 pixels reach the network (resize method and size): part of the cache key


@dataclass
class FidelityConfig:
    metrics: tuple[str, ...] = ("fid", "kid", "prc")  # any of fid, kid, prc (precision/recall/f_score)
    batch_size: int = 32         # images per extractor forward pass
    cuda: bool = False           # run the extractor on the GPU
    kid_subsets: int = 100       # torch-fidelity's default
    kid_subset_size: int = 1000  # torch-fidelity's default; capped at half the smaller set (see module docstring)
    prc_neighborhood: int = 3    # k of the k-NN manifold radii (torch-fidelity's default); capped at n - 1
    seed: int = 2020             # KID subset sampling (torch-fidelity's default rng_seed)
    bootstrap: int = 200         # resamples of the generated features for 95% intervals (intervals.py); 0 = none
    bootstrap_seed: int = 0      # seed of those resamples
    cache_dir: str = "runs/fid_cache"  # where reference features are cached (.npz)


@dataclass
class FidelityResult:
    metrics: dict[str, float]   # fid_<tag>, kid_<tag>, kid_std_<tag>, precision_<tag>, recall_<tag>, f_score_<tag>
    n_generated: int
    n_reference: int
    kid_subset_size: int        # what KID actually used (0 when KID was not asked for or the sets are too small)
    prc_neighborhood: int       # what precision/recall actually used (0 when not asked for)
    reference_cache: str | None  # the .npz holding the reference features, None when not cached
    cache_hit: bool
    notes: list[str] = field(default_factory=list)  # metrics asked for but not computed, and why
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)  # metric -> 95% bootstrap (lo, hi)


def metric_tag(registry_name: str) -> str:
    """'inception-v3-compat' -> 'inception', 'digits-classifier' -> 'digits', 'my-net' -> 'my_net'."""
    if registry_name == INCEPTION:
        return "inception"
    return registry_name.removesuffix("-classifier").replace("-", "_")


def inception_extractor(weights_path: str | Path = DEFAULT_INCEPTION_PATH) -> Extractor:
    path = Path(weights_path)
    if not path.is_file():
        raise MissingWeights(f"{path} not found: the FID Inception weights are never downloaded at run time. "
                             f"Run `{inception_command(path)}` first.")
    # torch-fidelity resizes every image to 299x299 with its TF1-exact bilinear resize, inside the extractor.
    return Extractor(INCEPTION, "inception", str(path), sha256_file(path), "tf1-bilinear-299")


def registered_extractor(name: str, weights_path: str | Path, weights_hash: str, protocol: str,
                         tag: str | None = None) -> Extractor:
    """Any extractor registered with torch_fidelity.register_feature_extractor (see pipelines/metrics/extractors.py)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise KeyError(f"feature extractor {name!r} is not registered with torch-fidelity (registered: "
                       f"{sorted(FEATURE_EXTRACTORS_REGISTRY)}); register it first, e.g. "
                       f"pipelines.metrics.extractors.classifier_extractor(checkpoint_dir).")
    return Extractor(name, tag or metric_tag(name), str(weights_path), weights_hash, protocol)


# ---------------------------------------------------------------------------------------------------- images


def as_uint8_images(images: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    """(N, 3, H, W) uint8 from a tensor or an iterable of (3, H, W) / (B, 3, H, W) uint8 tensors."""
    parts = [images] if torch.is_tensor(images) else list(images)
    parts = [p.unsqueeze(0) if p.dim() == 3 else p for p in parts]
    if not parts:
        raise ValueError("fid: got an empty image set")
    for p in parts:
        if p.dtype != torch.uint8 or p.dim() != 4 or p.shape[1] != 3:
            raise ValueError(f"fid: expected uint8 RGB images (N, 3, H, W), got {p.dtype} {tuple(p.shape)}; "
                             f"convert model output in [-1, 1] with data.media.to_uint8")
    return torch.cat([p.cpu() for p in parts])


class ImageDataset(Dataset):
    """The Dataset input torch-fidelity wants: item i is the uint8 (3, H, W) image i."""

    def __init__(self, images: torch.Tensor | Iterable[torch.Tensor]):
        self.images = as_uint8_images(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


# ---------------------------------------------------------------------------------------------------- statistics


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and unbiased covariance (D, D), both float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"fid: need at least 2 feature vectors (N, D) for a covariance, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64 (Heusel et al. 2017).

    With few samples S1 S2 is singular and sqrtm can return inf/nan or a sizeable imaginary part; then both
    covariances get eps on the diagonal and the root is taken again (the usual fix of the reference code).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"fid: mismatched statistics {mu1.shape} {s1.shape} vs {mu2.shape} {s2.shape}")

    def root_of_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray(scipy.linalg.sqrtm(a @ b))

    covmean = root_of_product(s1, s2)
    if not np.isfinite(covmean).all() or np.abs(np.imag(np.diagonal(covmean))).max() > 1e-3:
        offset = np.eye(s1.shape[0]) * eps
        covmean = root_of_product(s1 + offset, s2 + offset)
    if np.abs(np.imag(np.diagonal(covmean))).max() > 1e-3:
        raise ValueError("fid: sqrtm(S1 S2) stayed complex after the eps fix; the covariances are degenerate "
                         "(too few or identical images?)")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


# ---------------------------------------------------------------------------------------------------- features


def _fidelity_kwargs(extractor: Extractor, cfg: FidelityConfig) -> dict:
    return dict(feature_extractor=extractor.name, feature_extractor_weights_path=extractor.weights_path,
                cuda=cfg.cuda, batch_size=cfg.batch_size, verbose=False)


def extract_features(images: torch.Tensor | Iterable[torch.Tensor], extractor: Extractor,
                     cfg: FidelityConfig) -> np.ndarray:
    """(N, D) float32 features of the layer torch-fidelity uses for FID with this extractor."""
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset, \
        resolve_feature_layer_for_metric

    kwargs = _fidelity_kwargs(extractor, cfg)
    layer = resolve_feature_layer_for_metric("fid", **kwargs)
    net = create_feature_extractor(extractor.name, [layer], **kwargs)
    # save_cpu_ram=True means DataLoader(num_workers=0): the images are in memory already, workers only copy them.
    feats = get_featuresdict_from_dataset(ImageDataset(images), net, cfg.batch_size, cfg.cuda,
                                          save_cpu_ram=True, verbose=False)[layer]
    return feats.float().numpy()  # (N, D)


def reference_cache_path(reference_id: str, extractor: Extractor, cfg: FidelityConfig) -> tuple[Path, dict]:
    meta = {"version": CACHE_VERSION, "reference_id": reference_id, "extractor": extractor.name,
            "weights_sha256": extractor.weights_hash, "protocol": extractor.protocol}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]
    return Path(cfg.cache_dir) / f"ref-{extractor.tag}-{key}.npz", meta


def read_reference_cache(path: Path, meta: dict) -> np.ndarray | None:
    """The cached reference features at `path` (None when there are none), refused if written for other `meta`."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        stored = json.loads(str(z["meta"]))
        if stored != meta:
            raise ValueError(f"{path} was written for {stored}, not {meta}; delete it and rerun.")
        return z["features"]


def write_reference_cache(path: Path, meta: dict, feats: np.ndarray) -> None:
    mu, sigma = feature_statistics(feats)  # stored for readers that want FID only; raises below 2 images
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        np.savez(tmp, features=feats, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta, sort_keys=True)))


def reference_features(reference: torch.Tensor | Iterable[torch.Tensor], reference_id: str | None,
                       extractor: Extractor, cfg: FidelityConfig) -> tuple[np.ndarray, Path | None, bool]:
    """(features, cache path or None, cache hit). On a hit `reference` is never iterated."""
    if reference_id is None:
        return extract_features(reference, extractor, cfg), None, False
    path, meta = reference_cache_path(reference_id, extractor, cfg)
    cached = read_reference_cache(path, meta)
    if cached is not None:
        return cached, path, True
    feats = extract_features(reference, extractor, cfg)
    write_reference_cache(path, meta, feats)
    return feats, path, False


# ---------------------------------------------------------------------------------------------------- metrics


def _kid_subset_size(cfg: FidelityConfig, n1: int, n2: int) -> int:
    """0 when a set is too small for KID; else at most half the smaller set, so the subsets differ."""
    if min(n1, n2) < KID_MIN_IMAGES:
        return 0
    return min(cfg.kid_subset_size, min(n1, n2) // 2)


def _prc_neighborhood(cfg: FidelityConfig, n1: int, n2: int) -> int:
    # The k-th neighbour radius needs k + 1 points per set (a point is its own nearest neighbour).
    return max(1, min(cfg.prc_neighborhood, n1 - 1, n2 - 1))


def metrics_from_features(gen: np.ndarray, ref: np.ndarray, tag: str, cfg: FidelityConfig) -> FidelityResult:
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    unknown = set(cfg.metrics) - {"fid", "kid", "prc"}
    if unknown:
        raise ValueError(f"fid: unknown metrics {sorted(unknown)}; choose from fid, kid, prc")
    n1, n2 = len(gen), len(ref)
    if min(n1, n2) < 2:
        raise ValueError(f"fid: need at least 2 images per set, got {n1} generated and {n2} reference")
    out: dict[str, float] = {}
    notes: list[str] = []
    kid_m = prc_k = 0
    if "fid" in cfg.metrics:
        out[f"fid_{tag}"] = frechet_distance(*feature_statistics(gen), *feature_statistics(ref))
    if "kid" in cfg.metrics:
        kid_m = _kid_subset_size(cfg, n1, n2)
        if kid_m:
            kid = kid_features_to_metric(torch.from_numpy(gen), torch.from_numpy(ref), kid_subsets=cfg.kid_subsets,
                                         kid_subset_size=kid_m, rng_seed=cfg.seed, verbose=False)
            out[f"kid_{tag}"], out[f"kid_std_{tag}"] = kid[KEY_METRIC_KID_MEAN], kid[KEY_METRIC_KID_STD]
        else:
            notes.append(f"kid_{tag} not computed: {n1} generated and {n2} reference images, KID needs at least "
                         f"{KID_MIN_IMAGES} per side")
    if "prc" in cfg.metrics:
        prc_k = _prc_neighborhood(cfg, n1, n2)
        # torch-fidelity's convention: input 1 = generated, input 2 = real.
        prc = prc_features_to_metric(torch.from_numpy(gen), torch.from_numpy(ref), prc_neighborhood=prc_k,
                                     verbose=False)
        out.update({f"{k}_{tag}": float(prc[k]) for k in ("precision", "recall", "f_score")})
    intervals = fidelity_intervals(gen, ref, tag, kid_m, prc_k, cfg.bootstrap, cfg.bootstrap_seed, cfg.metrics, out)
    return FidelityResult(out, n1, n2, kid_m, prc_k, None, False, notes, intervals)


def compute_fidelity(generated: torch.Tensor | Iterable[torch.Tensor],
                     reference: torch.Tensor | Iterable[torch.Tensor], extractor: Extractor,
                     cfg: FidelityConfig | None = None, reference_id: str | None = None) -> FidelityResult:
    """Metrics of `generated` against `reference`, named after the extractor (fid_inception, kid_digits, ...)."""
    cfg = cfg or FidelityConfig()
    ref, cache, hit = reference_features(reference, reference_id, extractor, cfg)
    gen = extract_features(generated, extractor, cfg)
    result = metrics_from_features(gen, ref, extractor.tag, cfg)
    result.reference_cache, result.cache_hit = (str(cache) if cache else None), hit
    return result


def fidelity_of_shares(generated: Share, reference: Share, extractor: Extractor, cfg: FidelityConfig,
                       reference_id: str, acc) -> FidelityResult | None:
    """compute_fidelity over several processes (pipelines/metrics/shares.py): every process extracts the features of
    its share of both sets, the main process gets them all in the sets' order and returns the metrics (None on the
    others). The main process alone reads and writes the reference cache; on a hit no process extracts the
    reference."""
    def features(share: Share) -> np.ndarray:
        return map_rows(lambda x: torch.from_numpy(extract_features(x, extractor, cfg)), share, acc).numpy()

    main = acc is None or acc.is_main_process
    path, meta = reference_cache_path(reference_id, extractor, cfg)
    cached = read_reference_cache(path, meta) if main else None
    hit = broadcast(cached is not None, acc)
    ref = cached if hit else features(reference)
    gen = features(generated)
    if not main:
        return None
    if not hit:
        write_reference_cache(path, meta, ref)
    result = metrics_from_features(gen, ref, extractor.tag, cfg)
    result.reference_cache, result.cache_hit = str(path), hit
    return result


def torch_fidelity_metrics(generated: torch.Tensor | Iterable[torch.Tensor],
                           reference: torch.Tensor | Iterable[torch.Tensor], extractor: Extractor,
                           cfg: FidelityConfig | None = None) -> dict[str, float]:
    """The same comparison entirely through torch_fidelity.calculate_metrics (no cache): a cross-check."""
    import torch_fidelity

    cfg = cfg or FidelityConfig()
    gen, ref = ImageDataset(generated), ImageDataset(reference)
    n1, n2 = len(gen), len(ref)
    kid_m = _kid_subset_size(cfg, n1, n2)  # the subset size compute_fidelity uses; no KID where it gives none
    raw = torch_fidelity.calculate_metrics(
        input1=gen, input2=ref, fid="fid" in cfg.metrics, kid="kid" in cfg.metrics and kid_m > 0,
        prc="prc" in cfg.metrics, kid_subsets=cfg.kid_subsets, kid_subset_size=kid_m,
        prc_neighborhood=_prc_neighborhood(cfg, n1, n2), rng_seed=cfg.seed, cache=False, save_cpu_ram=True,
        **_fidelity_kwargs(extractor, cfg))
    names = {torch_fidelity.KEY_METRIC_FID: "fid", torch_fidelity.KEY_METRIC_KID_MEAN: "kid",
             torch_fidelity.KEY_METRIC_KID_STD: "kid_std", torch_fidelity.KEY_METRIC_PRECISION: "precision",
             torch_fidelity.KEY_METRIC_RECALL: "recall", torch_fidelity.KEY_METRIC_F_SCORE: "f_score"}
    return {f"{names[k]}_{extractor.tag}": float(v) for k, v in raw.items() if k in names}
