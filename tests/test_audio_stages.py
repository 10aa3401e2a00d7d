"""A 1-D (audio) tokenizer through reconstruct, sample and evaluate: the same stages and code paths as images, the
modality taken from the media manifest (wav files at the shards' sample rate, spectrogram grids, whole-clip SNR instead
of PSNR/SSIM, Inception skipped with a note: generated clips are judged by the log-mel classifier)."""
import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from data.audio import to_int16
from data.files import sha256_file
from data.shards import read_manifest, shard_name
from data.tokens import TokenManifest, TokenSample, media_timing, write_token_shard
from pipelines import evaluate, reconstruct, sample, train_prior
from pipelines.checkpoint import load_tokenizer, save_checkpoint
from pipelines.config import parse_config, to_dict
from pipelines.metrics.audio_eval import AudioEvalConfig
from pipelines.metrics.grids import MIN_WIDTH, PAD, SPEC_HEIGHT, SPEC_WIDTH, upscale_factor
from prior import SampleSettings
from tokenizer import TokenizerConfig, build_tokenizer
from helpers import tone_shards

QUICK = AudioEvalConfig(speech_metrics=())  # PESQ/STOI/ViSQOL/CREPE: tests/test_audio_eval.py; here the stages
RATE, CLIP = 8_000, 0.512  # 4,096 samples: the audio-s downsampling factor 64 -> 64 tokens
K, GRID, CLASSES = 64, (64,), ["high", "low"]


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    """(media shards of two tones, an untrained 1-D tokenizer whose train_config names them, a prior trained for
    3 steps on token shards recorded as that tokenizer's)."""
    root = tmp_path_factory.mktemp("audio")
    shards = tone_shards(root, per_class=6, rate=RATE, clip_seconds=CLIP)

    torch.manual_seed(0)
    tok_cfg = TokenizerConfig(size="audio-s", dims=1, in_channels=1, num_codes=K)
    tok = root / "tokenizer"
    config = {"kind": "tokenizer", "config": to_dict(tok_cfg), "train_config": {"data": str(shards)}}
    save_checkpoint(tok, config=config, weights={"model": build_tokenizer(tok_cfg).state_dict()})

    tokens = root / "tokens"
    tokens.mkdir()
    counts, rng = {}, np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 4)):
        labels = rng.integers(0, 2, n)
        codes = (10 * labels[:, None] + rng.integers(0, 4, (n, *GRID))) % K  # (n, 64)
        write_token_shard(tokens / shard_name(split, 0),
                          [TokenSample(f"{split}{i}", codes[i], int(labels[i])) for i in range(n)], K)
        counts[split] = n
    TokenManifest(tokenizer_sha256=sha256_file(tok / "model.safetensors"), quantizer="simvq", num_codes=K,
                  grid=list(GRID), counts=counts, class_names=CLASSES,
                  source_manifest_sha256=sha256_file(shards / "manifest.json"), shards={"train": 1, "val": 1},
                  media=media_timing(read_manifest(shards).spec, 64)).save(tokens)
    prior = root / "prior"
    train_prior.main(parse_config(train_prior.TrainPriorConfig, [
        f"--tokens={tokens}", f"--out={prior}", "--batch_size=8", "--model.size=tiny", "--loop.steps=3",
        "--loop.warmup_steps=0", "--loop.lr=1e-3"]))
    return shards, tok, prior


@pytest.fixture(scope="module")
def samples(audio_run, tmp_path_factory):
    _, tok, prior = audio_run
    out = tmp_path_factory.mktemp("samples")
    manifest = sample.main(sample.SampleConfig(prior=str(prior), tokenizer=str(tok), out=str(out), num_per_class=2,
                                               decode_batch=4, device="cpu"))
    return out, manifest


def test_reconstruct_a_1d_tokenizer_by_the_media_modality(audio_run, tmp_path):
    shards, tok, _ = audio_run
    m = reconstruct.main(reconstruct.ReconstructConfig(tokenizer=str(tok), data=str(shards), out=str(tmp_path),
                                                       audio=QUICK))
    val = json.loads((shards / "manifest.json").read_text())["counts"]["val"]
    # whole clips (0.6 s = 4,800 samples, padded to 75 hops of 64), not the 0.512-s training crops
    assert m["val/samples"] == val and m["val/tokens"] == val * 75 and m["usage/tokens"] > 0
    assert np.isfinite(m["val/snr"]) and 0 < m["val/recon_l1"] < 2
    assert "val/psnr" not in m and "val/ssim" not in m  # image metrics belong to images
    with Image.open(tmp_path / "recon.png") as im:  # spectrograms, originals above reconstructions
        assert im.mode == "RGB" and im.width >= MIN_WIDTH


def test_sample_writes_wav_at_the_shards_rate(audio_run, samples):
    _, tok, prior = audio_run
    out, manifest = samples
    assert manifest["modality"] == "audio" and manifest["extension"] == "wav" and manifest["shape"] == [1, 4096]
    assert manifest["media"]["sample_rate"] == RATE and manifest["media_from"].endswith("shards/manifest.json")
    on_disk = json.loads((out / "manifest.json").read_text())["samples"]
    assert [r["path"] for r in on_disk] == [f"media/{c}/{i:06d}.wav" for c in CLASSES for i in range(2)]
    for i, r in enumerate(on_disk):  # per sample what a codec user looks for: file, label, seed, rate, duration
        info = soundfile.info(out / r["path"])
        assert (info.samplerate, info.frames, info.channels, info.subtype) == (RATE, 4096, 1, "PCM_16")
        assert r == {"path": r["path"], "label": i // 2, "class": CLASSES[i // 2], "seed": i, "sample_rate": RATE,
                     "frames": 4096, "seconds": 4096 / RATE}
    # spectrogram grids, one PNG per class: 2 samples side by side, upscaled to >= MIN_WIDTH
    assert sorted(p.name for p in (out / "grids").iterdir()) == [f"{c}.png" for c in sorted(CLASSES)]
    s = upscale_factor(SPEC_WIDTH, 2)
    for path in [out / "grids" / f"{c}.png" for c in CLASSES] + [out / "grid.png"]:  # grid.png: a row per class
        rows = 2 if path.name == "grid.png" else 1
        with Image.open(path) as im:
            assert im.mode == "RGB" and im.size == (PAD + 2 * (s * SPEC_WIDTH + PAD), PAD + rows * (s * SPEC_HEIGHT + PAD))
            assert im.width >= MIN_WIDTH
    # the files hold exactly the int16 of the decoder's output for the same seeds (data.media's writer)
    p, _, _ = sample.load_prior(prior)
    tokenizer, _ = load_tokenizer(tok)
    x = sample.generate(p, tokenizer, torch.tensor([0, 0]), SampleSettings(), [0, 1], GRID, decode_batch=4)
    written = [soundfile.read(out / r["path"], dtype="int16")[0] for r in on_disk[:2]]
    assert np.array_equal(np.stack(written), to_int16(x[:, 0]).numpy())


def test_evaluate_a_1d_tokenizer_and_its_samples(audio_run, samples, tmp_path):
    shards, tok, _ = audio_run
    out, manifest = samples
    cfg = evaluate.EvaluateConfig(data=str(shards), tokenizer=str(tok), samples=str(out), out=str(tmp_path),
                                  lpips_vgg16_path="unused.pth", audio=QUICK)
    cfg.fidelity.cache_dir = str(tmp_path / "cache")  # the digit classifier's cache stays out of the repository
    m = evaluate.main(cfg)
    recon = reconstruct.main(reconstruct.ReconstructConfig(tokenizer=str(tok), data=str(shards),
                                                           out=str(tmp_path / "r"), audio=QUICK))
    assert m["recon/snr"] == recon["val/snr"] and m["recon/recon_l1"] == recon["val/recon_l1"]  # one code path
    assert m["gen/samples"] == manifest["count"] == 4
    assert not any("fid" in k or "lpips" in k or "psnr" in k for k in m)  # Inception, LPIPS, PSNR: images only
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["extractors"] == [] and any(n.startswith("inception skipped") for n in record["notes"])
    with Image.open(tmp_path / "recon.png") as im:  # spectrograms, originals above reconstructions
        assert im.mode == "RGB" and im.width >= MIN_WIDTH


def test_sample_takes_the_wav_rate_from_the_token_manifest_without_media_shards(audio_run, tmp_path):
    """A tokenizer checkpoint that names no training data (e.g. converted, or moved): the rate comes from the media
    timing encode_shards recorded in the token manifest, which the prior carries, not from MediaSpec's 24 kHz."""
    _, tok, prior = audio_run
    bare = tmp_path / "tokenizer"  # the same weights (so the same tokenizer_sha256), no train_config
    config = json.loads((tok / "config.json").read_text())
    save_checkpoint(bare, config={"kind": "tokenizer", "config": config["config"]},
                    weights={"model": load_tokenizer(tok)[0].state_dict()})
    m = sample.main(sample.SampleConfig(prior=str(prior), tokenizer=str(bare), out=str(tmp_path / "s"),
                                        num_per_class=1, device="cpu"))
    assert m["media"]["sample_rate"] == RATE and "token manifest" in m["media_from"]
    assert m["token_manifest"]["media"] == {"modality": "audio", "sample_rate": RATE, "hop": 64,
                                            "tokens_per_second": RATE / 64, "clip_seconds": CLIP}
    assert soundfile.info(tmp_path / "s" / "media" / "high" / "000000.wav").samplerate == RATE
