"""evaluate for audio: whole-clip reconstruction metrics with counted failures, and generated clips judged by the
log-mel digit classifier (class accuracy, Inception-style score, Fréchet distance on its features)."""
import json
import math
import shutil

import numpy as np
import pytest
import soundfile
import torch

from data.files import sha256_file
from pipelines import evaluate
from pipelines.checkpoint import save_checkpoint
from pipelines.config import parse_config, to_dict
from pipelines.metrics.audio_eval import AudioEvalConfig, full_clips, score_clips
from tokenizer import TokenizerConfig, build_tokenizer

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="espeak-ng missing: apt-get install -y espeak-ng flite")
TINY_NET = {"n_filters": 4, "z_channels": 32, "dim": 64, "intermediate_dim": 64, "num_layers": 1}


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    """(digits shards of 24 voices, strings shards of 6 voices)"""
    from pipelines import make_shards
    root = tmp_path_factory.mktemp("spoken")
    for source, voices in (("spoken-digits", 24), ("spoken-digit-strings", 6)):
        make_shards.main(parse_config(make_shards.MakeShardsConfig, [
            f"--source={source}", f"--out={root / source}", f"--voices={voices}", "--val_fraction=0.25"]))
    return root / "spoken-digits", root / "spoken-digit-strings"


def tiny_tokenizer(path, num_codes=64):
    torch.manual_seed(0)
    cfg = TokenizerConfig(arch="seanet-vocos", size="cpu", net=TINY_NET, dims=1, in_channels=1, num_codes=num_codes)
    save_checkpoint(path, config={"kind": "tokenizer", "config": to_dict(cfg)},
                    weights={"model": build_tokenizer(cfg).state_dict()})
    return path


def test_identity_scores_and_counted_failures():
    t = torch.arange(32000) / 16000
    x = (0.3 * torch.sin(2 * math.pi * 220 * t) * (1 + torch.sin(2 * math.pi * 3 * t)))[None]
    short = x[..., :16000]
    cfg = AudioEvalConfig(speech_metrics=("pesq", "stoi"), crepe_model="tiny")
    m = score_clips([x, short], [x.clone(), short.clone()], 16000, cfg)
    assert m["mel_distance"] == 0 and m["recon_l1"] == 0 and m["snr"] > 90
    assert m["pesq_count"] == 1 and m["pesq_failures"] == 1  # the 1-s clip is too short for PESQ
    assert m["pesq"] > 4.5 and m["stoi"] > 0.99
    m = score_clips([short], [short.clone()], 16000, cfg)  # nothing scorable: counts only, never a NaN mean
    assert "pesq" not in m and m["pesq_failures"] == 1 and all(math.isfinite(v) for v in m.values())


def test_full_clips_are_whole_files(spoken):
    clips = full_clips(spoken[1], "val")
    seconds = [c.x.shape[-1] / 16000 for c in clips]
    assert clips and all(2.0 <= s <= 4.0 for s in seconds) and len(set(seconds)) > 1  # not the 1-s read crops
    assert len(full_clips(spoken[1], "val", limit=2)) == 2


def test_evaluate_audio_reconstruction(spoken, tmp_path):
    tok = tiny_tokenizer(tmp_path / "tok")
    m = evaluate.main(parse_config(evaluate.EvaluateConfig, [
        f"--data={spoken[1]}", f"--tokenizer={tok}", f"--out={tmp_path / 'e'}", "--audio.max_clips=3",
        "--audio.crepe_model=tiny", "--audio.speech_metrics=pesq,stoi,vuv_f1", f"--fidelity.cache_dir={tmp_path}"]))
    for key in ("recon/mel_distance", "recon/si_sdr", "recon/stft_distance", "recon/snr", "recon/pesq", "recon/stoi",
                "recon/vuv_f1", "recon/utilisation", "usage/utilisation"):
        assert math.isfinite(m[key]), key
    assert m["recon/samples"] == 3 and m["recon/pesq_count"] + m["recon/pesq_failures"] == 3
    assert m["recon/tokens_per_second"] == 50 and m["recon/bitrate_kbps"] == pytest.approx(0.3)  # 50 x log2 64
    assert m["recon/mel_distance"] > 0 and m["recon/pesq"] < 3  # an untrained tokenizer is far from identity
    assert (tmp_path / "e" / "recon.png").is_file()
    record = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert record["settings"]["audio"]["crepe_model"] == "tiny"


def write_samples(folder, clips, labels, data):
    """A samples directory as pipelines.sample writes it (manifest version 2, wav files)."""
    media = folder / "media"
    media.mkdir(parents=True)
    items = []
    for i, (x, label) in enumerate(zip(clips, labels)):
        path = media / f"{i:06d}.wav"
        soundfile.write(path, x[0].numpy(), 16000, subtype="PCM_16")
        items.append({"path": str(path.relative_to(folder)), "label": int(label)})
    (folder / "manifest.json").write_text(json.dumps({
        "format": "simvq-samples", "version": 2, "extension": "wav", "samples": items,
        "source_manifest_sha256": sha256_file(data / "manifest.json")}))
    return folder


def test_generated_clips_judged_by_the_digit_classifier(spoken, tmp_path):
    """Real held-out clips as 'samples' are recognised and close to the train clips; noise is neither."""
    digits = spoken[0]
    real = full_clips(digits, "val")
    noise = [torch.randn(1, 16000) * 0.1 for _ in real]
    labels = [c.label for c in real]
    results = {}
    for name, clips in (("real", [c.x for c in real]), ("noise", noise)):
        samples = write_samples(tmp_path / name, clips, labels, digits)
        results[name] = evaluate.main(parse_config(evaluate.EvaluateConfig, [
            f"--data={digits}", f"--samples={samples}", f"--out={tmp_path / ('e' + name)}",
            f"--fidelity.cache_dir={tmp_path / 'cache'}", "--classifier_cfg.min_steps=60", "--classifier_cfg.width=8",
            "--classifier_cfg.feature_dim=32"]))
    tag = "spoken_digits"
    real_m, noise_m = results["real"], results["noise"]
    assert real_m[f"gen/class_accuracy_{tag}"] > 0.6 > 0.3 > noise_m[f"gen/class_accuracy_{tag}"]
    assert noise_m[f"gen/fd_{tag}"] > 5 * real_m[f"gen/fd_{tag}"]
    assert real_m[f"gen/is_{tag}"] > noise_m[f"gen/is_{tag}"]
    assert not any(k.startswith("gen/fid_") for k in real_m)  # a Fréchet distance on classifier features, named so
    record = json.loads((tmp_path / "ereal" / "metrics.json").read_text())
    assert record["classifier"]["config"]["modality"] == "audio" and record["classifier"]["heldout_accuracy"] > 0.5
