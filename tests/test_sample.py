"""Sampling end to end on a tiny tokenizer and a prior trained for a few steps by train_prior: files, grids and
manifest, seeds independent of batch size, and refusal of a tokenizer the prior was not trained for."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data.files import sha256_file
from data.media import to_uint8
from data.shards import shard_name
from data.tokens import TokenManifest, TokenSample, write_token_shard
from pipelines import sample, train_prior
from pipelines.checkpoint import checkpoint_hash, load_tokenizer, save_checkpoint
from pipelines.config import parse_config, to_dict
from prior import SampleSettings
from tokenizer import TokenizerConfig, build_tokenizer

K, GRID, CLASSES = 64, (4, 4), ["zero", "one", "two"]


def make_tokenizer(path, seed=0, num_codes=K):
    torch.manual_seed(seed)
    cfg = TokenizerConfig(size="tiny", num_codes=num_codes)
    model = build_tokenizer(cfg)
    save_checkpoint(path, config={"kind": "tokenizer", "config": to_dict(cfg)}, weights={"model": model.state_dict()})
    return path


def make_pair(root, class_names):
    """(tokenizer checkpoint, prior run dir) where the prior trained on tokens recorded as this tokenizer's;
    class_names=[] gives unlabelled tokens and so an unconditional prior."""
    tok = make_tokenizer(root / "tokenizer")
    tokens = root / "tokens"
    tokens.mkdir()
    rng = np.random.default_rng(0)
    counts = {}
    for split, n in (("train", 48), ("val", 8)):
        labels = rng.integers(0, max(1, len(class_names)), n)
        codes = (10 * labels[:, None, None] + rng.integers(0, 4, (n, *GRID))) % K  # (n, 4, 4)
        stored = labels if class_names else np.full(n, -1)
        write_token_shard(tokens / shard_name(split, 0),
                          [TokenSample(f"{split}{i}", codes[i], int(stored[i])) for i in range(n)], K)
        counts[split] = n
    # tokenizer_sha256 as encode_shards records it: the sha256 of model.safetensors
    TokenManifest(tokenizer_sha256=sha256_file(tok / "model.safetensors"), quantizer="simvq", num_codes=K,
                  grid=list(GRID), counts=counts, class_names=class_names, source_manifest_sha256="cd" * 32,
                  shards={"train": 1, "val": 1}).save(tokens)
    run = root / "prior"
    train_prior.main(parse_config(train_prior.TrainPriorConfig, [
        f"--tokens={tokens}", f"--out={run}", "--batch_size=8", "--model.size=tiny", "--loop.steps=3",
        "--loop.warmup_steps=0", "--loop.lr=1e-3"]))
    return tok, run


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"), CLASSES)


def test_unconditional_prior_takes_num_per_class_without_guidance(tmp_path):
    tok, prior = make_pair(tmp_path / "u", [])
    m = sample_main(f"--prior={prior}", f"--tokenizer={tok}", f"--out={tmp_path / 's'}", "--num_per_class=3",
                    "--settings.cfg_scale=2")
    assert m["count"] == 3 and m["conditional"] is False and m["settings"]["cfg_scale"] == 1.0
    assert len(list((tmp_path / "s" / "media").glob("*.png"))) == 3


def sample_main(*argv):
    return sample.main(parse_config(sample.SampleConfig, list(argv)))


def run_sample(pair, out, *extra):
    tok, prior = pair
    return sample_main(f"--prior={prior}", f"--tokenizer={tok}", f"--out={out}", "--device=cpu", *extra)


def pixels(out):
    """Every image the sample manifest lists, in its order."""
    manifest = json.loads((out / "manifest.json").read_text())
    return np.stack([np.asarray(Image.open(out / r["path"])) for r in manifest["samples"]])  # (N, H, W, 3)


def test_end_to_end_files_grids_manifest(pair, tmp_path):
    out = tmp_path / "s"
    manifest = run_sample(pair, out, "--num_per_class=3", "--batch_size=4", "--seed=7", "--settings.top_k=10",
                          "--settings.temperature=0.9")
    for name in CLASSES:
        files = sorted((out / "media" / name).glob("*.png"))
        assert [f.name for f in files] == ["000000.png", "000001.png", "000002.png"]
        with Image.open(files[0]) as im:
            assert im.size == (16, 16) and im.mode == "RGB"
        with Image.open(out / "grids" / f"{name}.png") as im:
            # ceil(sqrt(3)) = 2 columns of 16 px, upscaled x16 to reach MIN_WIDTH = 512, + 2 px borders
            assert im.size == (2 + 2 * (16 * 16 + 2), 2 + 2 * (16 * 16 + 2))
            first = np.asarray(im)[2:2 + 256, 2:2 + 256]  # the first sample, each pixel a 16x16 block (nearest)
        assert np.array_equal(first, np.asarray(Image.open(files[0])).repeat(16, 0).repeat(16, 1))
    with Image.open(out / "grid.png") as im:
        assert im.size == (2 + 3 * (11 * 16 + 2), 2 + 3 * (11 * 16 + 2))  # 3 class rows x 3 samples, upscaled x11
    on_disk = json.loads((out / "manifest.json").read_text())
    assert manifest == {k: v for k, v in on_disk.items() if k != "samples"}
    assert manifest["count"] == 9 and manifest["seed"] == 7 and manifest["shape"] == [3, 16, 16]
    assert manifest["modality"] == "image" and manifest["extension"] == "png"
    assert manifest["settings"] == to_dict(SampleSettings(top_k=10, temperature=0.9))
    assert manifest["class_names"] == CLASSES and manifest["classes"] == CLASSES and manifest["grid"] == list(GRID)
    tok, prior = pair
    assert manifest["tokenizer"]["checkpoint_sha256"] == checkpoint_hash(tok)
    assert manifest["tokenizer"]["weights_sha256"] == manifest["token_manifest"]["tokenizer_sha256"]
    assert manifest["prior"]["checkpoint_sha256"] == checkpoint_hash(manifest["prior"]["path"])
    assert manifest["prior"]["step"] == 3 and manifest["source_manifest_sha256"] == "cd" * 32
    assert [r["seed"] for r in on_disk["samples"]] == list(range(7, 16))
    assert [r["label"] for r in on_disk["samples"]] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert on_disk["samples"][4] == {"path": "media/one/000001.png", "label": 1, "class": "one", "seed": 11}
    with pytest.raises(FileExistsError, match="overwrite"):
        run_sample(pair, out, "--num_per_class=3")


def test_seeds_not_batch_size_decide_the_images(pair, tmp_path):
    # 9 samples in decoder groups of 4; batch sizes 6, 1 and 9 cut the prior's batches (and main's chunks) apart
    # differently. Without the fixed decoder groups, batch 6 vs 1 differed in one uint8 of 4,608.
    args = ["--num_per_class=3", "--seed=3", "--settings.cfg_scale=1.5", "--decode_batch=4"]
    run_sample(pair, tmp_path / "a", *args, "--batch_size=6")
    run_sample(pair, tmp_path / "b", *args, "--batch_size=6")
    run_sample(pair, tmp_path / "c", *args, "--batch_size=1")
    run_sample(pair, tmp_path / "c9", *args, "--batch_size=9")
    run_sample(pair, tmp_path / "d", "--num_per_class=3", "--seed=4", "--settings.cfg_scale=1.5",
                   "--decode_batch=4")
    pa, pb, pc, pc9, pd = (pixels(tmp_path / x) for x in ("a", "b", "c", "c9", "d"))
    assert np.array_equal(pa, pb) and np.array_equal(pa, pc) and np.array_equal(pa, pc9)
    assert not np.array_equal(pa, pd)  # the seed does matter
    # and a subset of classes, selected by name or index, reproduces the same samples when at the same position
    e = run_sample(pair, tmp_path / "e", "--num_per_class=2", "--seed=3", "--settings.cfg_scale=1.5",
                   "--decode_batch=4", "--classes=zero,1")
    assert e["count"] == 4 and e["classes"] == ["zero", "one"]
    assert np.array_equal(pixels(tmp_path / "e")[:2], pa[:2])  # class "zero", seeds 3 and 4


def test_unconditional_and_generate(pair, tmp_path):
    m = run_sample(pair, tmp_path / "u", "--num=5", "--batch_size=2")
    assert sorted(p.name for p in (tmp_path / "u" / "media").glob("*.png")) == [f"{i:06d}.png" for i in range(5)]
    assert m["conditional"] is False and m["count"] == 5
    # generate() is the reusable core: the decoder's output (N, 3, H, W) in [-1, 1], whose uint8 are the files
    tok, run = pair
    prior, _, _ = sample.load_prior(run)
    tokenizer, _ = load_tokenizer(tok)
    x = sample.generate(prior, tokenizer, None, SampleSettings(), seeds=[0, 1, 2, 3, 4], grid=GRID)
    assert x.dtype == torch.float32 and x.shape == (5, 3, 16, 16) and x.abs().max() <= 1
    images = to_uint8(x)
    assert np.array_equal(images.permute(0, 2, 3, 1).numpy(), pixels(tmp_path / "u"))


def test_refuses_a_foreign_tokenizer(pair, tmp_path):
    tok, run = pair
    other = make_tokenizer(tmp_path / "other", seed=1)  # same architecture and K, other weights
    with pytest.raises(sample.IncompatibleCheckpoints, match="tokenizer_sha256"):
        sample_main(f"--prior={run}", f"--tokenizer={other}", f"--out={tmp_path / 'x'}")
    small = make_tokenizer(tmp_path / "small", num_codes=32)
    with pytest.raises(sample.IncompatibleCheckpoints, match="num_codes: prior trained on 64, tokenizer has 32"):
        sample_main(f"--prior={run}", f"--tokenizer={small}", f"--out={tmp_path / 'x'}")
    assert not (tmp_path / "x").exists()
    # generate() alone checks code ids against the tokenizer's K before decoding
    prior, _, _ = sample.load_prior(run)
    tokenizer, _ = load_tokenizer(small)
    with pytest.raises(sample.IncompatibleCheckpoints, match="K=32"):
        sample.generate(prior, tokenizer, torch.tensor([0, 1, 2, 0]), SampleSettings(), [0, 1, 2, 3], GRID)
    with pytest.raises(ValueError, match="not a prior"):
        sample.load_prior(tok)
