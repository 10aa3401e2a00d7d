"""Spoken digits through every stage, as a user runs them: make_shards -> train_tokenizer (the paper's seanet-vocos arch
at toy widths) -> encode_shards -> train_prior -> sample (wav files, spectrogram grids) -> evaluate. A few steps each:
this proves the stages fit together on real audio files, not that anything learns (issue 11)."""
import json
import math
import shutil

import pytest
import soundfile
from PIL import Image

from pipelines import encode_shards, evaluate, make_shards, sample, train_prior, train_tokenizer
from pipelines.config import parse_config
from pipelines.metrics.audio_eval import AudioEvalConfig
from pipelines.metrics.grids import MIN_WIDTH
from tokenizer.losses import GENERATOR_LOSSES

RATE, HOP = 16_000, 320  # the built-in's rate; seanet-vocos strides (2, 4, 5, 8): 50 tokens per second of audio
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# seanet-vocos at toy widths (SeanetVocosConfig fields; the pos_net GroupNorm has 32 groups, so dim is a multiple of 32)
TOY_NET = {"n_filters": 4, "z_channels": 32, "dim": 32, "intermediate_dim": 64, "num_layers": 1, "lstm_layers": 0}
# recon/mel is the paper's reconstruction loss (tokenizer/losses/mel.py); older trees have only L1
LOSSES = {"recon/l1": 1.0, "vq/commit": 1.0} | ({"recon/mel": 1.0} if "recon/mel" in GENERATOR_LOSSES else {})


def numbers(tree):
    """Every int/float in a JSON tree (bools are not numbers here)."""
    if isinstance(tree, dict):
        return [n for v in tree.values() for n in numbers(v)]
    if isinstance(tree, list):
        return [n for v in tree for n in numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


def test_spoken_digits_through_every_stage(tmp_path):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (the spoken digits' synthesiser): apt-get install -y espeak-ng, or "
                    "`source scripts/env.sh && ensure_speech_tools`")
    shards, tok, tokens, prior, samples, ev = (tmp_path / n for n in ("shards", "tok", "tokens", "prior", "s", "e"))

    # 10 voices x 10 digits = 100 clips of 1 s; a speaker-disjoint val split of a few voices
    media = make_shards.main(parse_config(make_shards.MakeShardsConfig, [
        "--source=spoken-digits", f"--out={shards}", "--voices=10", "--workers=2", "--val_fraction=0.3"]))
    assert media.class_names == DIGITS and media.spec.sample_rate == RATE and media.counts["val"] > 0
    assert sum(media.counts.values()) == 100

    logs = train_tokenizer.main(parse_config(train_tokenizer.TrainTokenizerConfig, [
        f"--data={shards}", f"--out={tok}", "--model.arch=seanet-vocos", "--model.size=cpu", "--model.dims=1",
        "--model.in_channels=1", "--model.num_codes=64", f"--model.net={json.dumps(TOY_NET)}",
        f"--losses.weights={json.dumps(LOSSES)}", "--batch_size=4", "--loop.steps=3", "--loop.log_every=1",
        "--loop.warmup_steps=0", "--loop.lr=1e-3", "--loop.mixed_precision=no"]))
    assert all(math.isfinite(v) for v in numbers(logs)) and "val/recon_l1" in logs

    manifest = encode_shards.main(parse_config(encode_shards.EncodeShardsConfig, [
        f"--data={shards}", f"--tokenizer={tok}", f"--out={tokens}", "--device=cpu"]))
    assert manifest.grid == [RATE // HOP] and manifest.counts == media.counts
    assert manifest.media == {"modality": "audio", "sample_rate": RATE, "hop": HOP, "tokens_per_second": 50.0,
                              "clip_seconds": 1.0}

    logs = train_prior.main(parse_config(train_prior.TrainPriorConfig, [
        f"--tokens={tokens}", f"--out={prior}", "--model.size=tiny", "--batch_size=8", "--loop.steps=3",
        "--loop.warmup_steps=0"]))
    assert all(math.isfinite(v) for v in numbers(logs))

    m = sample.main(parse_config(sample.SampleConfig, [
        f"--prior={prior}", f"--tokenizer={tok}", f"--out={samples}", "--num_per_class=2", "--device=cpu"]))
    records = json.loads((samples / "manifest.json").read_text())["samples"]
    assert m["count"] == len(records) == 20 and m["media"]["sample_rate"] == RATE
    for r in records:
        info = soundfile.info(samples / r["path"])
        assert (info.samplerate, info.frames, info.channels, info.subtype) == (RATE, RATE, 1, "PCM_16")
        assert (r["sample_rate"], r["frames"], r["seconds"]) == (RATE, RATE, 1.0) and r["class"] == DIGITS[r["label"]]
    assert sorted(p.name for p in (samples / "grids").iterdir()) == sorted(f"{d}.png" for d in DIGITS)
    with Image.open(samples / "grid.png") as im:
        assert im.width >= MIN_WIDTH and im.mode == "RGB"

    # no speech metrics: CREPE's full model takes ~10 s a clip on a CPU, and PESQ/STOI/ViSQOL need >= 2 s (1-s clips)
    cfg = evaluate.EvaluateConfig(data=str(shards), tokenizer=str(tok), samples=str(samples), out=str(ev),
                                  device="cpu", lpips_vgg16_path="unused.pth",
                                  audio=AudioEvalConfig(speech_metrics=(), max_clips=8))
    cfg.fidelity.cache_dir = str(tmp_path / "fid_cache")  # the classifier and feature caches stay in tmp_path
    metrics = evaluate.main(cfg)
    record = json.loads((ev / "metrics.json").read_text(), parse_constant=lambda c: float(c))  # NaN stays NaN
    assert metrics["gen/samples"] == 20 and "recon/snr" in metrics
    assert all(math.isfinite(v) for v in numbers(metrics)), metrics
    assert all(math.isfinite(v) for v in numbers(record)), record
