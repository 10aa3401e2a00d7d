"""evaluate under 2 CPU processes (torchrun, what `accelerate launch --multi_gpu --num_processes=2` runs): each reads
and featurises its share of the samples, the val split and the train split, the main process computes every metric:
metrics.json equals the one-process one to float rounding, for images (domain-classifier FID/KID/PR on a
max_reference subset, class accuracy, PSNR/SSIM, LPIPS, rFID, codebook usage) and audio (whole-clip reconstruction
with counted speech-metric failures, the log-mel classifier's FD/IS/class accuracy)."""
from __future__ import annotations

import json

import pytest

from data.builtin import open_source
from data.media import MediaSpec
from data.shards import list_shards, write_media_shards
from pipelines import sample
from pipelines.config import parse_config
from helpers import write_tones
from test_sample_sharded import digit_shards, tiny_run, torchrun


@pytest.fixture(scope="module", params=["image", "audio"])
def run(request, tmp_path_factory, lpips_files):
    """(modality, shards, tokenizer, samples, the evaluate settings of the modality)"""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "image":
        shards = digit_shards(root / "shards")  # 120 digits, 16 a shard: ~6 train and 2 val shards
        vgg, lin = lpips_files
        extra = ["--extractors=domain", "--max_reference=40", f"--lpips_vgg16_path={vgg}", f"--lpips_lin_path={lin}"]
    else:
        write_tones(root / "wavs", per_class=8, rate=8_000)
        shards = root / "shards"  # 3 clips a shard: several shards per split
        write_media_shards(open_source(str(root / "wavs"), "audio", 0, 0, 0, "auto"), shards,
                           MediaSpec(modality="audio", sample_rate=8_000, clip_seconds=0.512), val_fraction=0.25,
                           max_count=3, log=lambda *a: None)
        extra = ["--audio.speech_metrics=pesq,stoi"]  # 0.6-s clips: every clip a counted failure
    assert len(list_shards(shards, "val")) >= 2 and len(list_shards(shards, "train")) >= 3
    tok, prior = tiny_run(root, shards)
    samples = root / "samples"
    sample.main(parse_config(sample.SampleConfig, [f"--prior={prior}", f"--tokenizer={tok}", f"--out={samples}",
                                                   "--num_per_class=3", "--device=cpu"]))
    return request.param, shards, tok, samples, [*extra, "--classifier_cfg.epochs=2", "--device=cpu"]


def test_two_processes_write_the_metrics_of_one(run, tmp_path):
    modality, shards, tok, samples, extra = run

    def argv(name):  # each run trains its own classifier and caches its own reference features
        return [f"--data={shards}", f"--tokenizer={tok}", f"--samples={samples}", f"--out={tmp_path / name}",
                f"--fidelity.cache_dir={tmp_path / name / 'cache'}", *extra]

    torchrun("pipelines.evaluate", *argv("one"), processes=1)
    torchrun("pipelines.evaluate", *argv("two"))
    a, b = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two"))
    assert sorted(b["metrics"]) == sorted(a["metrics"])
    for key, value in a["metrics"].items():
        assert b["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    expected = {"image": ("gen/fid_digits", "gen/kid_digits", "gen/precision_digits", "gen/class_accuracy_digits",
                          "recon/psnr", "recon/lpips", "recon/fid_digits", "usage/utilisation"),
                "audio": ("recon/snr", "recon/pesq_failures", "recon/stoi_failures", "usage/utilisation",
                          "gen/fd_wavs", "gen/is_wavs", "gen/class_accuracy_wavs")}[modality]
    assert set(expected) <= set(a["metrics"]), sorted(a["metrics"])
    assert a["classifier"]["config"] == b["classifier"]["config"]
    for key in ("subsets", "reference", "extractors", "notes"):  # the same items, by the same extractor weights
        same_dirs = json.dumps(b.get(key)).replace(str(tmp_path / "two"), str(tmp_path / "one"))
        assert json.loads(same_dirs) == a.get(key), key
    assert (tmp_path / "two" / "recon.png").read_bytes() == (tmp_path / "one" / "recon.png").read_bytes()
