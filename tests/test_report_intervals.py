"""Intervals in the tokenizer-impact report: bootstrap intervals over samples (synthetic features), the rule that flags
a difference between presets, and compare run over several seeds (a few training steps on digits)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch_fidelity.metric_prc import prc_features_to_metric

from data.tokens import TokenManifest
from pipelines import compare, demo, import_official
from pipelines.config import parse_config
from pipelines.metrics.fid import FidelityConfig, feature_statistics, frechet_distance, metrics_from_features
from pipelines.metrics.intervals import (bootstrap_fid, bootstrap_kid, bootstrap_prc, disjoint, interval_metrics,
                                         mean_interval, seed_interval)

METRICS = ("fid", "kid", "prc")


def features(n: int, seed: int, shift: float = 0.0, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, 1.0, size=(n, dim))


def intervals_of(gen: np.ndarray, ref: np.ndarray, resamples: int = 100, metrics: tuple = METRICS) -> dict:
    res = metrics_from_features(gen, ref, "t", FidelityConfig(metrics=metrics, kid_subsets=10, bootstrap=resamples))
    return res.intervals


# ---------------------------------------------------------------------------------------------- bootstrap
def test_a_resample_holding_every_sample_once_gives_the_metrics_themselves():
    gen, ref = features(40, 0, 0.3, dim=12), features(90, 1, dim=12)
    ones = np.ones((1, len(gen)), dtype=int)
    assert bootstrap_fid(gen, ref, ones)[0] == pytest.approx(
        frechet_distance(*feature_statistics(gen), *feature_statistics(ref)), rel=1e-9)
    # fewer samples than dimensions: the n x n route
    small = gen[:9]
    assert bootstrap_fid(small, ref, np.ones((1, 9), dtype=int))[0] == pytest.approx(
        frechet_distance(*feature_statistics(small), *feature_statistics(ref)), rel=1e-6)
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3  # noqa: E731 torch-fidelity's KID kernel
    n, m = len(gen), len(ref)
    mmd = ((k(gen, gen).sum() - np.trace(k(gen, gen))) / (n * (n - 1))
           + (k(ref, ref).sum() - np.trace(k(ref, ref))) / (m * (m - 1)) - 2 * k(gen, ref).mean())
    assert bootstrap_kid(gen, ref, ones)[0] == pytest.approx(mmd, rel=1e-9)
    precision, recall = bootstrap_prc(gen, ref, ones, 3)
    theirs = prc_features_to_metric(torch.from_numpy(gen).float(), torch.from_numpy(ref).float(), prc_neighborhood=3,
                                    prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    assert precision[0] == pytest.approx(theirs["precision"], abs=1e-6)
    assert recall[0] == pytest.approx(theirs["recall"], abs=1e-6)


def test_intervals_shrink_with_more_samples():
    ref = features(400, 99)
    few, many = intervals_of(features(30, 1, 0.3), ref), intervals_of(features(480, 1, 0.3), ref)
    assert set(few) == set(many) == {f"{m}_t" for m in ("fid", "kid", "precision", "recall", "f_score")}
    for name in few:
        width_few, width_many = few[name][1] - few[name][0], many[name][1] - many[name][0]
        assert 0 < width_many < 0.6 * width_few, (name, few[name], many[name])
    values = np.random.default_rng(0).normal(size=1000)
    widths = [np.subtract(*mean_interval(values[:n], 200, 0)[::-1]) for n in (25, 100, 1000)]
    assert widths[0] > widths[1] > widths[2] > 0


def test_intervals_are_seeded_and_hold_the_estimate():
    gen, ref = features(80, 3, 0.5), features(300, 4)
    res = metrics_from_features(gen, ref, "t", FidelityConfig(kid_subsets=20, bootstrap=100, bootstrap_seed=7))
    again = metrics_from_features(gen, ref, "t", FidelityConfig(kid_subsets=20, bootstrap=100, bootstrap_seed=7))
    assert res.intervals == again.intervals
    for name in ("fid_t", "precision_t", "recall_t"):
        lo, hi = res.intervals[name]
        assert lo < res.metrics[name] < hi, (name, lo, res.metrics[name], hi)
    assert metrics_from_features(gen, ref, "t", FidelityConfig(kid_subsets=20, bootstrap=0)).intervals == {}
    assert mean_interval([1.0, None], 100, 0) is None  # one scored value: no interval
    assert interval_metrics("gen/fid_t", (1.0, 2.0)) == {"gen/fid_t/ci95_lo": 1.0, "gen/fid_t/ci95_hi": 2.0}


# ---------------------------------------------------------------------------------------------- flagging
def test_draws_of_one_distribution_are_never_flagged_and_a_shift_is():
    ref = features(300, 1000)
    for trial in range(6):
        a, b, shifted = (intervals_of(features(100, seed, shift), ref, 60, ("fid", "prc"))
                         for seed, shift in ((2 * trial, 0.4), (2 * trial + 1, 0.4), (2 * trial + 1, 1.2)))
        for name in ("fid_t", "precision_t", "recall_t"):
            assert not disjoint(a[name], b[name]), (trial, name, a[name], b[name])
        assert disjoint(a["fid_t"], shifted["fid_t"]), (trial, a["fid_t"], shifted["fid_t"])
    assert seed_interval([1.0, 2.0], [None, None]) == pytest.approx((1.5 - 1.0, 1.5 + 1.0))  # mean +- 2 sem
    assert seed_interval([1.0], [None]) is None and not disjoint(None, (0.0, 1.0))
    assert seed_interval([1.0, 1.2], [(0.0, 3.0), None]) == (0.0, 3.0)  # the hull


def synthetic_run(seed: int, shift: float, ref: np.ndarray) -> dict:
    res = metrics_from_features(features(100, seed, shift), ref, "t", FidelityConfig(kid_subsets=10, bootstrap=60))
    metrics = {f"gen/{k}": v for k, v in res.metrics.items()}
    for k, interval in res.intervals.items():
        metrics.update(interval_metrics(f"gen/{k}", interval))
    return {"seed": seed, "metrics": metrics, "seconds": {"evaluate": 1.0}, "dirs": {"evaluate": f"e{seed}{shift}"}}


def test_a_preset_differing_only_in_seed_is_never_marked_in_the_report(tmp_path):
    """Rows 'a' and 'a-again' are the same generator (features of one distribution) under other seeds; 'far' is
    another. The report marks 'far' (intervals disjoint from the best) and never 'a' against 'a-again'."""
    ref = features(300, 1000)
    rows = [compare.aggregate({"preset": name, "quantizer": "simvq", "K": 64, "tokenizer": None, "grids": {}},
                              [synthetic_run(s, shift, ref) for s in seeds])
            for name, seeds, shift in (("a", (0, 1), 0.4), ("a-again", (2, 3), 0.4), ("far", (4, 5), 1.5))]
    cfg = compare.CompareConfig(data="synthetic", out=str(tmp_path), seeds=(0, 1))
    text = compare.write_report(cfg, rows).read_text()
    table = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| a")
             or line.startswith("| far")}
    head = [h.strip() for h in text.split("\n| preset | K |")[1].splitlines()[0].strip(" |").split(" | ")]
    col = ["preset", "K"] + head
    fid = col.index("gFID t")
    cells = {name: line.strip("| ").split(" | ")[fid] for name, line in table.items()}
    assert "†" not in cells["a"] + cells["a-again"], cells
    assert cells["far"].endswith("†"), cells
    assert sum(c.startswith("**") for c in cells.values()) == 1  # one best
    finding = text.split("## Finding")[1].split("\n## ")[0]
    assert "better by more than the intervals than far" in finding
    assert "not separable from" in finding and ("a-again (" in finding or "a (" in finding)
    row = rows[0]
    for key in ("gen/fid_t", "gen/precision_t"):
        values = [run["metrics"][key] for run in row["runs"]]
        assert row["metrics"][key] == pytest.approx(np.mean(values))
        assert row["std"][key] == pytest.approx(np.std(values, ddof=1))
        boot = [(run["metrics"][f"{key}/ci95_lo"], run["metrics"][f"{key}/ci95_hi"]) for run in row["runs"]]
        assert tuple(row["intervals"][key]) == pytest.approx(seed_interval(values, boot))


# ---------------------------------------------------------------------------------------------- compare over seeds
@pytest.fixture(scope="module")
def seeded(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("seeded")
    base = demo.stage_overrides(demo.DemoConfig(quick=True))
    base["tokenizer"]["model"]["num_codes"] = 64
    base["tokenizer"]["loop"]["steps"] = 10
    base["prior"]["loop"]["steps"] = 10
    base["sample"]["num_per_class"] = 2
    base["evaluate"] = {"extractors": "domain", "fidelity": {"cache_dir": str(out / "fid_cache"), "bootstrap": 50},
                        "classifier_cfg": {"epochs": 1, "width": 4, "feature_dim": 8}}
    official = import_official.main(import_official.ImportOfficialConfig(
        ckpt=str(Path(__file__).parent / "fixtures" / "official_simvq" / "image_small_state.safetensors"),
        out=str(out / "official_tokenizer")))
    base["tokenizers"] = {"paper-small": str(official)}
    argv = [f"--data={digits_shards}", f"--out={out}", "--presets=simvq-64"]
    compare.main(parse_config(compare.CompareConfig, argv + ["--seeds=0"], base))
    first = {p: p.stat().st_mtime_ns for p in out.rglob("*.done.json")}
    compare.main(parse_config(compare.CompareConfig, argv + ["--seeds=0,1"], base))  # adds seed 1
    return out, first


def test_adding_a_seed_runs_only_the_new_seed(seeded):
    out, first = seeded
    assert first and all(p.stat().st_mtime_ns == t for p, t in first.items())  # seed 0 reused, untouched
    assert (out / "simvq-64" / "seed-1" / "eval" / "metrics.json").is_file()
    prior = json.loads((out / "simvq-64" / "seed-1" / "prior.done.json").read_text())["config"]
    tok = json.loads((out / "simvq-64" / "seed-1" / "tokenizer.done.json").read_text())["config"]
    samples = json.loads((out / "simvq-64" / "seed-1" / "samples" / "manifest.json").read_text())
    assert prior["loop"]["seed"] == tok["loop"]["seed"] == 1 and samples["seed"] == 1_000_000
    # a given tokenizer's tokens do not depend on the seed: encoded once, shared by its seeds
    assert (out / "paper-small" / "tokens.done.json").is_file()
    assert not (out / "paper-small" / "seed-1" / "tokens").exists()
    assert TokenManifest.load(out / "paper-small" / "tokens").num_codes == 1024


def test_report_numbers_equal_each_runs_metrics_json(seeded):
    out, _ = seeded
    rows = json.loads((out / "report.json").read_text())
    text = (out / "report.md").read_text()
    assert [r["preset"] for r in rows] == ["simvq-64", "paper-small"]
    for row in rows:
        assert row["seeds"] == [0, 1] and len(row["runs"]) == 2
        files = [json.loads((Path(run["dirs"]["evaluate"]) / "metrics.json").read_text())["metrics"]
                 for run in row["runs"]]
        for run, written in zip(row["runs"], files):
            assert {k: run["metrics"][k] for k in written} == written
            assert "gen/fid_digits/ci95_lo" in written and "gen/class_accuracy_digits/ci95_hi" in written
        for key in ("gen/fid_digits", "gen/precision_digits", "gen/class_accuracy_digits", "recon/psnr"):
            values = [m[key] for m in files]
            assert row["metrics"][key] == pytest.approx(np.mean(values), rel=1e-12)
            assert row["std"][key] == pytest.approx(np.std(values, ddof=1), rel=1e-12)
        assert row["intervals"]["gen/fid_digits"][0] <= min(m["gen/fid_digits/ci95_lo"] for m in files)
        line = next(x for x in text.splitlines() if x.startswith(f"| {row['preset']}"))
        mean, std = row["metrics"]["gen/fid_digits"], row["std"]["gen/fid_digits"]
        assert f"{mean:.3g} ± {std:.3g} [" in line
    assert "## Finding (written by compare from the numbers above)" in text and "Seeds: 0, 1" in text
