"""pack_tokens: codes made elsewhere (LlamaGen's one-.npy-per-sample folders, one array) -> token shards that
train_prior takes unchanged and that sample decodes only with the tokenizer the manifest names."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.errors import UserError
from data.tokens import load_tokens
from pipelines import import_official, pack_tokens, sample, train_prior
from pipelines.checkpoint import load_tokenizer, weights_sha256
from pipelines.config import parse_config
from pipelines.pack_tokens import PackError, PackTokensConfig

OFFICIAL = Path(__file__).parent / "fixtures" / "official_simvq" / "image_small_state.safetensors"
K, SIDE = 1024, 16  # the converted small official tokenizer: 64x64 images -> 16x16 codes


@pytest.fixture(scope="module")
def official_tokenizer(tmp_path_factory):
    out = tmp_path_factory.mktemp("official") / "tok"
    return import_official.main(import_official.ImportOfficialConfig(ckpt=str(OFFICIAL), out=str(out)))


def llamagen_folder(root: Path, n: int, views: int = 1, seed: int = 0) -> tuple[Path, Path, np.ndarray]:
    """codes/<i>.npy of shape (views, 256) int64 and labels/<i>.npy of shape (1,), as LlamaGen writes them."""
    rng = np.random.default_rng(seed)
    codes, labels = root / "codes", root / "labels"
    codes.mkdir(parents=True)
    labels.mkdir()
    all_codes = rng.integers(0, K, (n, views, SIDE * SIDE))
    for i in range(n):
        np.save(codes / f"{i}.npy", all_codes[i])
        np.save(labels / f"{i}.npy", np.array([i % 3]))
    return codes, labels, all_codes


def test_llamagen_folder_trains_a_prior_that_samples_with_its_tokenizer(tmp_path, official_tokenizer):
    codes, labels, arrays = llamagen_folder(tmp_path, 24)
    out = tmp_path / "tokens"
    manifest = pack_tokens.main(PackTokensConfig(codes=str(codes), labels=str(labels), out=str(out),
                                                 tokenizer=str(official_tokenizer), val_fraction=0.25))
    assert manifest.grid == [SIDE, SIDE] and manifest.num_codes == K and manifest.class_names == ["0", "1", "2"]
    assert manifest.tokenizer_sha256 == weights_sha256(official_tokenizer)
    assert manifest.source["command"] == "pack_tokens" and len(manifest.source["sha256"]) == 64
    train, val = load_tokens(out, "train"), load_tokens(out, "val")
    assert len(train.keys) + len(val.keys) == 24 and len(val.keys) > 0
    for split in (train, val):  # codes in raster order, labels kept, per key
        for key, row, label in zip(split.keys, split.codes, split.labels):
            assert np.array_equal(row, arrays[int(key), 0]) and label == int(key) % 3
    run = tmp_path / "prior"
    train_prior.main(parse_config(train_prior.TrainPriorConfig, [
        f"--tokens={out}", f"--out={run}", "--batch_size=4", "--model.size=tiny", "--loop.steps=2",
        "--loop.warmup_steps=0"]))
    samples = tmp_path / "samples"
    result = sample.main(parse_config(sample.SampleConfig, [
        f"--prior={run}", f"--tokenizer={official_tokenizer}", f"--out={samples}", "--num_per_class=1"]))
    pngs = sorted(samples.rglob("*.png"))
    assert len([p for p in pngs if p.parent.parent.name == "media"]) == 3, result
    # any other tokenizer is refused, even one with the same K and grid
    other = import_official.main(import_official.ImportOfficialConfig(ckpt=str(OFFICIAL), raw=True,
                                                                      out=str(tmp_path / "raw_tok")))
    with pytest.raises(sample.IncompatibleCheckpoints, match="tokenizer_sha256"):
        sample.main(parse_config(sample.SampleConfig, [f"--prior={run}", f"--tokenizer={other}",
                                                        f"--out={tmp_path / 's2'}"]))


def test_packed_without_a_tokenizer_trains_but_never_decodes(tmp_path, official_tokenizer):
    codes, labels, _ = llamagen_folder(tmp_path, 8)
    out = tmp_path / "tokens"
    manifest = pack_tokens.main(PackTokensConfig(codes=str(codes), labels=str(labels), out=str(out), num_codes=K,
                                                 grid=(SIDE, SIDE)))
    assert manifest.tokenizer_sha256 == "" and manifest.quantizer == "unknown"
    run = tmp_path / "prior"
    train_prior.main(parse_config(train_prior.TrainPriorConfig, [
        f"--tokens={out}", f"--out={run}", "--batch_size=4", "--model.size=tiny", "--loop.steps=1",
        "--loop.warmup_steps=0"]))
    with pytest.raises(sample.IncompatibleCheckpoints, match="packed without a tokenizer"):
        sample.main(parse_config(sample.SampleConfig, [f"--prior={run}", f"--tokenizer={official_tokenizer}",
                                                        f"--out={tmp_path / 's'}"]))


def test_views_and_npz(tmp_path):
    codes, labels, arrays = llamagen_folder(tmp_path, 4, views=10)  # LlamaGen's ten-crop: (10, 256) per file
    first = pack_tokens.main(PackTokensConfig(codes=str(codes), labels=str(labels), out=str(tmp_path / "a"),
                                              num_codes=K, grid=(SIDE, SIDE), view=3))
    got = load_tokens(tmp_path / "a", "train")
    assert first.counts == {"train": 4} and np.array_equal(got.codes[0], arrays[0, 3])
    every = pack_tokens.main(PackTokensConfig(codes=str(codes), out=str(tmp_path / "b"), num_codes=K,
                                              grid=(SIDE, SIDE), view=-1))
    assert every.counts == {"train": 40} and every.class_names == []
    grid_codes = np.random.default_rng(1).integers(0, 50, (12, 4, 4)).astype(np.int32)
    np.savez(tmp_path / "c.npz", codes=grid_codes, labels=np.arange(12) % 4)
    m = pack_tokens.main(PackTokensConfig(codes=str(tmp_path / "c.npz"), out=str(tmp_path / "c"), num_codes=50,
                                          class_names=("a", "b", "c", "d")))
    got = load_tokens(tmp_path / "c", "train")
    assert m.grid == [4, 4] and m.class_names == ["a", "b", "c", "d"] and m.dtype == "uint8"
    assert np.array_equal(got.codes, grid_codes.reshape(12, 16)) and list(got.labels) == list(np.arange(12) % 4)
    with pytest.raises(UserError, match="already holds token shards"):
        pack_tokens.main(PackTokensConfig(codes=str(tmp_path / "c.npz"), out=str(tmp_path / "c"), num_codes=50))


def bad(tmp_path, name, array, **kw):
    path = tmp_path / f"{name}.npy"
    np.save(path, array)
    with pytest.raises(PackError) as e:
        pack_tokens.main(PackTokensConfig(codes=str(path), out=str(tmp_path / f"out_{name}"), **kw))
    assert not (tmp_path / f"out_{name}").exists()  # nothing written
    return str(e.value)


def test_refuses_bad_codes_before_writing(tmp_path, official_tokenizer):
    ok = np.zeros((4, 16, 16), np.int64)
    assert "outside [0, 1024)" in bad(tmp_path, "range", ok + 1024, tokenizer=str(official_tokenizer))
    assert "outside [0, 8)" in bad(tmp_path, "neg", ok - 1, num_codes=8)
    assert "NaN" in bad(tmp_path, "nan", np.full((4, 16, 16), np.nan), num_codes=8)
    assert "float32 values;" in bad(tmp_path, "float", ok.astype(np.float32), num_codes=8)
    assert "not a square grid" in bad(tmp_path, "flat", np.zeros((4, 15), np.int64), tokenizer=str(official_tokenizer))
    assert "--num_codes" in bad(tmp_path, "noK", ok)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.save(mixed / "0.npy", np.zeros((1, 256), np.int64))
    np.save(mixed / "1.npy", np.zeros((1, 255), np.int64))
    with pytest.raises(PackError, match="every sample must have one shape"):
        pack_tokens.main(PackTokensConfig(codes=str(mixed), out=str(tmp_path / "m"), num_codes=8, grid=(16, 16)))
    assert not (tmp_path / "m").exists()


def test_cli_error_is_one_line(tmp_path):
    np.save(tmp_path / "c.npy", np.full((2, 4), 9, np.int64))
    proc = subprocess.run([sys.executable, "-m", "pipelines.pack_tokens", f"--codes={tmp_path / 'c.npy'}",
                           f"--out={tmp_path / 'o'}", "--num_codes=4"], capture_output=True, text=True)
    assert proc.returncode == 2 and "outside [0, 4)" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
