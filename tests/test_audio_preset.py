"""Audio is a preset of the same code, not a copy: wav folder -> media shards -> 1-D SimVQ tokenizer -> token shards
-> prior, through the very stages the image pipeline uses, switched by `--modality=audio` / `--model.dims=1`."""
import json

import numpy as np

from data.tokens import load_tokens
from pipelines import encode_shards, make_shards, train_prior, train_tokenizer
from pipelines.config import parse_config
from helpers import write_tones

RATE, CLIP = 8_000, 0.512  # 4,096 samples: divisible by the audio-s downsampling factor 64 -> 64 tokens


def test_wav_folder_through_tokenizer_tokens_and_prior(tmp_path):
    write_tones(tmp_path / "wavs", per_class=12, rate=RATE)
    shards, tok, tokens, prior = (tmp_path / n for n in ("shards", "tok", "tokens", "prior"))
    manifest = make_shards.main(parse_config(make_shards.MakeShardsConfig, [
        f"--source={tmp_path / 'wavs'}", f"--out={shards}", "--modality=audio", f"--sample_rate={RATE}",
        f"--clip_seconds={CLIP}", "--val_fraction=0.25"]))
    assert manifest.class_names == ["high", "low"] and manifest.counts["val"] > 0

    train_tokenizer.main(parse_config(train_tokenizer.TrainTokenizerConfig, [
        f"--data={shards}", f"--out={tok}", "--model.dims=1", "--model.in_channels=1", "--model.size=audio-s",
        "--model.num_codes=64", "--batch_size=8", "--loop.steps=12", "--loop.log_every=1", "--loop.eval_every=12",
        "--loop.ckpt_every=12", "--loop.lr=1e-3",
        # spec §2: the commitment weight is 1000 for audio (inherited from WavTokenizer)
        '--losses.weights={"recon/l1": 1.0, "gan/g": 0.1, "vq/commit": 1000.0}']))
    logs = [json.loads(line) for line in (tok / "log.jsonl").read_text().splitlines()]
    l1 = [r["recon/l1"] for r in logs if "recon/l1" in r]  # one batch of 8 per step: noisy, so compare means
    assert np.mean(l1[-4:]) < np.mean(l1[:4]) and any("val/utilisation" in r for r in logs)

    token_manifest = encode_shards.main(parse_config(encode_shards.EncodeShardsConfig, [
        f"--data={shards}", f"--tokenizer={tok}", f"--out={tokens}"]))
    assert list(token_manifest.grid) == [64] and token_manifest.num_codes == 64
    train_set = load_tokens(tokens, "train")
    assert train_set.codes.shape[1] == 64 and set(train_set.labels.tolist()) == {0, 1}

    result = train_prior.main(parse_config(train_prior.TrainPriorConfig, [
        f"--tokens={tokens}", f"--out={prior}", "--model.size=tiny", "--loop.steps=5", "--loop.eval_every=5",
        "--loop.ckpt_every=5", "--batch_size=8"]))
    assert np.isfinite(result["val/loss"])
