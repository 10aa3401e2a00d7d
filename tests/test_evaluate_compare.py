"""The evaluation stage and the tokenizer-impact report, end to end on digits with a few training steps."""
import json

import pytest

from data.builtin import open_source
from data.media import MediaSpec
from data.shards import write_media_shards
from pipelines import compare, demo, evaluate


@pytest.fixture(scope="module")
def report(digits_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    base = demo.stage_overrides(demo.DemoConfig(quick=True))
    base["tokenizer"]["model"]["num_codes"] = 64
    base["evaluate"] = {"extractors": "domain", "fidelity": {"cache_dir": str(out / "fid_cache")}}
    argv = [f"--data={digits_shards}", f"--out={out}", "--presets=simvq-64"]
    compare.main(argv, base=base)
    return out, argv, base


def test_report_has_every_metric_named_by_its_extractor(report):
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
    assert (out / "metrics_vs_k.png").is_file() and (out / rows[0]["grids"]["samples"]).is_file()
    record = json.loads((out / "simvq-64" / "eval" / "metrics.json").read_text())
    assert record["extractors"][0]["tag"] == "digits" and record["classifier"]["heldout_accuracy"] > 0.8
    assert record["settings"]["samples"].endswith("samples") and record["tokenizer"]


def test_finished_stages_are_reused_and_changed_settings_refused(report):
    out, argv, base = report
    before = (out / "simvq-64" / "prior.done.json").stat().st_mtime_ns
    compare.main(argv, base=base)  # everything done: nothing reruns
    assert (out / "simvq-64" / "prior.done.json").stat().st_mtime_ns == before
    changed = json.loads(json.dumps(base))
    changed["prior"]["loop"]["steps"] = 31
    with pytest.raises(RuntimeError, match="other settings"):
        compare.main(argv, base=changed)


def test_evaluate_refuses_samples_from_another_dataset(report, tmp_path):
    out, _, _ = report
    other = tmp_path / "other"
    write_media_shards(open_source("digits", "image", 16, 0, 0, "auto"), other,
                       MediaSpec(modality="image", size=16), val_fraction=0.2, log=lambda *a: None)
    with pytest.raises(ValueError, match="evaluate against the dataset the prior was trained on"):
        evaluate.main([f"--data={other}", f"--samples={out / 'simvq-64' / 'samples'}", f"--out={tmp_path / 'e'}",
                       "--extractors=domain", f"--fidelity.cache_dir={tmp_path / 'c'}"])


def test_unknown_preset_fails_before_any_training(tmp_path):
    with pytest.raises(ValueError, match="is not <quantizer>-<K>"):
        compare.main([f"--data={tmp_path}", f"--out={tmp_path / 'o'}", "--presets=simvq-64,bogus-3"])


def test_evaluate_reports_lpips_given_weight_files(report, digits_shards, lpips_files, tmp_path):
    out, _, _ = report
    vgg, lin = lpips_files
    metrics = evaluate.main([f"--data={digits_shards}", f"--tokenizer={out / 'simvq-64' / 'tokenizer'}",
                             f"--out={tmp_path / 'e'}", "--extractors=", f"--lpips_vgg16_path={vgg}",
                             f"--lpips_lin_path={lin}", f"--fidelity.cache_dir={tmp_path / 'c'}"])
    assert metrics["recon/lpips"] > 0 and "recon/psnr" in metrics
    assert not any("fid" in k for k in metrics)  # no extractor asked for, none run
