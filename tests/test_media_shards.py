"""Media shards: round trip, odd image modes, corrupt files, split stability, loader determinism, audio."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from data.builtin import folder, photos
from data.errors import MediaError, UserError
from data.files import TEMP_MARK
from data.image import to_rgb
from data.media import MediaSpec, decode, normalise
from data.reader import media_loader, resume_position
from data.shards import (ManifestError, assign_split, iter_shard_samples, list_shards, read_manifest,
                         write_media_shards)
from pipelines import make_shards
from pipelines.config import parse_config

RNG = np.random.default_rng(0)
quiet = lambda msg: None  # noqa: E731


def save_image(path: Path, size=(12, 10), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode).save(path)


def make_folder(root: Path, per_class: int = 6) -> Path:
    for cls in ("cat", "dog"):
        for i in range(per_class):
            save_image(root / cls / f"img.{i}.png", size=(12 + i, 10))  # dots in the name: key must cope
    save_image(root / "dog" / "nested" / "deep.jpg")
    return root


def test_round_trip_labels_and_every_val_sample_once(tmp_path):
    src = make_folder(tmp_path / "src")
    out = tmp_path / "shards"
    manifest = write_media_shards(folder(src), out, MediaSpec(size=8), val_fraction=0.3, max_count=3, log=quiet)
    assert manifest.class_names == ["cat", "dog"] and sum(manifest.counts.values()) == 13
    assert manifest.counts["val"] > 0 and manifest.shards["train"] == -(-manifest.counts["train"] // 3)
    assert read_manifest(out).counts == manifest.counts
    for split in ("train", "val"):  # what is on disk is exactly the normalised source file
        for path in list_shards(out, split):
            for key, fields in iter_shard_samples(path):
                rel = next(p for p in src.rglob("*") if p.relative_to(src).as_posix().replace(".", "_") == key)
                assert fields["png"] == normalise(rel.read_bytes(), MediaSpec(size=8))
                assert int(fields["cls"]) == ["cat", "dog"].index(key.split("/")[0])
                assert assign_split(key, 0, 0.3) == split
    stored = {k: f["png"] for p in list_shards(out, "val") for k, f in iter_shard_samples(p)}
    seen = []
    for batch in media_loader(out, "val", batch_size=2, train=False):
        x, labels, keys = batch
        assert x.shape[1:] == (3, 8, 8) and x.dtype == torch.float32 and -1 <= x.min() <= x.max() <= 1
        assert labels.tolist() == [["cat", "dog"].index(k.split("/")[0]) for k in keys]
        for xi, key in zip(x, keys):  # eval = center crop: identical to decoding the stored bytes, no rng
            assert torch.equal(xi, decode(stored[key], manifest.spec, rng=None))
        seen += keys
    assert seen == list(stored)  # every val sample exactly once, in shard order


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK", "1", "I", "F"])
def test_odd_modes_decode_to_rgb(mode):
    grey = np.linspace(0, 1, 6 * 9).reshape(6, 9)
    if mode == "I;16":
        img = Image.fromarray((grey * 65535).astype(np.uint16))
    elif mode == "F":
        img = Image.fromarray(grey.astype(np.float32))
    else:
        img = Image.fromarray(RNG.integers(0, 256, (6, 9, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if mode in ("I;16", "I", "F", "CMYK") else "PNG")
    x = decode(normalise(buf.getvalue(), MediaSpec(size=4)), MediaSpec(size=4), rng=None)
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    if mode == "I;16":  # PIL's own convert would clip 16-bit values to white; we rescale them
        assert x.min() < -0.5 and x.max() > 0.5


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    assert np.asarray(to_rgb(img)).min() == 255


def test_corrupt_file_is_skipped_and_counted(tmp_path):
    src = make_folder(tmp_path / "src", per_class=2)
    (src / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    good = io.BytesIO()
    Image.new("RGB", (64, 64)).save(good, format="JPEG")
    (src / "dog" / "truncated.jpg").write_bytes(good.getvalue()[:200])
    logged = []
    manifest = write_media_shards(folder(src), tmp_path / "out", MediaSpec(size=8), log=logged.append)
    assert sorted(s["origin"] for s in manifest.skipped) == ["cat/broken.png", "dog/truncated.jpg"]
    assert sum(manifest.counts.values()) == 5 and len(logged) == 2 and any("cat/broken.png" in m for m in logged)
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["num_skipped"] == 2 and not list((tmp_path / "out").glob(f"*{TEMP_MARK}*"))


def test_skip_reasons_say_what_is_wrong_and_name_the_file(tmp_path):
    src = make_folder(tmp_path / "src", per_class=1)
    (src / "cat" / "empty.jpg").write_bytes(b"")
    (src / "cat" / "page.jpg").write_bytes(b"<html><body>404</body></html>")  # a failed download
    (src / "cat" / "header.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    jpeg = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    (src / "dog" / "cut.jpg").write_bytes(jpeg.getvalue()[:1500])
    logged = []
    manifest = write_media_shards(folder(src), tmp_path / "out", MediaSpec(size=8), log=logged.append)
    reasons = {s["origin"]: s["reason"] for s in manifest.skipped}
    assert set(reasons) == {"cat/empty.jpg", "cat/page.jpg", "cat/header.png", "dog/cut.jpg"}
    assert reasons["cat/empty.jpg"] == "zero-byte file"
    assert reasons["cat/page.jpg"] == "not an image: unrecognised format (29 bytes starting b'<html><body>')"
    assert reasons["cat/header.png"] == "corrupt PNG image: the header cannot be parsed"
    assert reasons["dog/cut.jpg"].startswith("truncated JPEG image (")
    assert sorted(logged) == sorted(f"make_shards: skipping {o}: {r}" for o, r in reasons.items())
    assert not any("BytesIO" in r for r in reasons.values())
    with pytest.raises(MediaError, match="^zero-byte file$"):
        normalise(b"", MediaSpec(modality="audio"))
    with pytest.raises(MediaError, match="^not a readable audio file: Error opening the file: Format not recognised"):
        normalise(b"RIFF nope", MediaSpec(modality="audio"))


def test_a_class_with_no_readable_file_is_dropped_and_labels_follow(tmp_path):
    src = tmp_path / "src"
    save_image(src / "ant" / "a.png")
    save_image(src / "cat" / "c.png")
    save_image(src / "cat" / "d.png")
    (src / "bee").mkdir()
    (src / "bee" / "empty.png").write_bytes(b"")
    (src / "bee" / "junk.jpg").write_bytes(b"not an image")
    logged = []
    manifest = write_media_shards(folder(src), tmp_path / "out", MediaSpec(size=8), val_fraction=0.0,
                                  log=logged.append)
    assert manifest.class_names == ["ant", "cat"] and manifest.dropped_classes == ["bee"]
    assert read_manifest(tmp_path / "out").dropped_classes == ["bee"]
    assert "make_shards: dropping 1 class(es) with no readable file: bee" in logged
    labels = {key: int(f["cls"]) for p in list_shards(tmp_path / "out", "train") for key, f in iter_shard_samples(p)}
    assert labels == {"ant/a_png": 0, "cat/c_png": 1, "cat/d_png": 1}  # "cat" is class 1, not 2
    batch = next(iter(media_loader(tmp_path / "out", "train", batch_size=3, train=False)))
    assert sorted(batch.labels.tolist()) == [0, 1, 1]


def test_folder_shards_mix_classes_and_are_byte_identical_for_a_seed(tmp_path):
    src = tmp_path / "src"
    for c in range(10):
        for i in range(10):
            save_image(src / f"class{c}" / f"{i}.png", size=(4, 4))

    def shards(out: Path, seed: int) -> list[bytes]:
        manifest = write_media_shards(folder(src), out, MediaSpec(size=4), val_fraction=0.0, max_count=10,
                                      shuffle_seed=seed, log=quiet)
        assert manifest.shuffle_seed == seed and json.loads((out / "manifest.json").read_text())["shuffle_seed"] == seed
        return [p.read_bytes() for p in list_shards(out, "train")]

    first = shards(tmp_path / "a", seed=0)
    assert len(first) == 10
    for path in list_shards(tmp_path / "a", "train"):  # written in path order, each shard would hold one class
        assert len({key.split("/")[0] for key, _ in iter_shard_samples(path)}) >= 4
    assert shards(tmp_path / "b", seed=0) == first  # the same seed: the same bytes
    assert shards(tmp_path / "c", seed=1) != first


def _pgm16(values: np.ndarray) -> bytes:  # 16-bit PGM: PIL opens it as mode "I"
    return f"P5\n{values.shape[1]} {values.shape[0]}\n65535\n".encode() + values.astype(">u2").tobytes()


def _encoded(values: np.ndarray, dtype, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(dtype)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("make, mode", [(lambda v: _encoded(v, np.uint16, "PNG"), "I;16"),
                                        (lambda v: _encoded(v, ">u2", "TIFF"), "I;16B"),
                                        (_pgm16, "I")], ids=["png-I;16", "tiff-I;16B", "pgm-I"])
def test_a_dark_16_bit_image_stays_dark(make, mode):
    values = np.array([[0, 100, 200, 255], [255, 200, 100, 0]])  # all <= 255: still 16-bit values, near black
    data = make(values)
    assert Image.open(io.BytesIO(data)).mode == mode
    stored = Image.open(io.BytesIO(normalise(data, MediaSpec(size=2, resize="none"))))
    assert np.asarray(stored)[..., 0].tolist() == np.rint(values * 255 / 65535).astype(int).tolist()  # 0 or 1
    eight_bit = normalise(_encoded(values, np.uint8, "PNG"), MediaSpec(size=2, resize="none"))
    assert np.asarray(Image.open(io.BytesIO(eight_bit)))[..., 0].tolist() == values.tolist()


def test_split_is_stable_when_a_file_is_added(tmp_path):
    src = make_folder(tmp_path / "src", per_class=10)

    def splits(out):
        write_media_shards(folder(src), out, MediaSpec(size=8), val_fraction=0.3, overwrite=True, log=quiet)
        return {k: s for s in ("train", "val") for p in list_shards(out, s) for k, _ in iter_shard_samples(p)}

    before = splits(tmp_path / "a")
    save_image(src / "cat" / "new.png")
    after = splits(tmp_path / "a")
    assert set(after) == set(before) | {"cat/new_png"}
    assert all(after[k] == s for k, s in before.items())
    assert "val" in before.values() and "train" in before.values()


def test_overwrite_removes_stale_shards_and_a_crash_leaves_no_manifest(tmp_path):
    src, out = make_folder(tmp_path / "src"), tmp_path / "out"
    first = write_media_shards(folder(src), out, MediaSpec(size=8), val_fraction=0.0, max_count=2, log=quiet)
    assert first.shards["train"] == 7
    write_media_shards(folder(src), out, MediaSpec(size=8), val_fraction=0.0, overwrite=True, log=quiet)
    assert len(list_shards(out, "train")) == 1 and read_manifest(out).shards["train"] == 1

    source = folder(src)

    def explode() -> bytes:
        raise RuntimeError("simulated crash")
    source.items.insert(5, source.items[5]._replace(key="zz", read=explode))
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_media_shards(source, out, MediaSpec(size=8), max_count=2, overwrite=True, log=quiet)
    assert not (out / "manifest.json").exists() and not list(out.glob(f"*{TEMP_MARK}*"))
    with pytest.raises(ManifestError, match="make_shards"):
        media_loader(out, "train", batch_size=2, train=False)


def test_missing_manifest_names_the_next_step(tmp_path):
    with pytest.raises(ManifestError, match=r"manifest.json not found.*pipelines.make_shards"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "simvq-media-shards", "version": 99}))
    with pytest.raises(ManifestError, match="version 99"):
        read_manifest(tmp_path)


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("photos")
    write_media_shards(photos(size=8, count=120), out, MediaSpec(size=8), max_count=25, log=quiet)
    return out


def _stream(out, **kw):
    return [(b.keys, b.x) for b in media_loader(out, "train", batch_size=4, train=True, epoch_len=6, **kw)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_stream_is_deterministic_and_resumable(photo_shards, num_workers):
    torch.manual_seed(0)
    state = torch.get_rng_state()
    full = _stream(photo_shards, seed=5, epoch=1, num_workers=num_workers)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is neither read nor consumed
    assert len(full) == 6 and all(x.shape == (4, 3, 8, 8) for _, x in full)
    again = _stream(photo_shards, seed=5, epoch=1, num_workers=num_workers)
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(full, again))
    for skip in (1, 3):  # resumed mid-epoch: the same batches as the uninterrupted run
        resumed = _stream(photo_shards, seed=5, epoch=1, num_workers=num_workers, skip_batches=skip)
        assert len(resumed) == 6 - skip
        assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(resumed, full[skip:]))
    assert _stream(photo_shards, seed=5, epoch=2, num_workers=num_workers)[0][0] != full[0][0]
    assert resume_position(13, 6, num_workers) == (2, 1)


def test_random_crop_moves_along_the_long_side(tmp_path):
    img = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8)[None, :, None] * 6, (8, 1, 3)))  # 8x40 gradient
    img.save(tmp_path / "wide.png")
    spec = MediaSpec(size=8)
    stored = normalise((tmp_path / "wide.png").read_bytes(), spec)
    assert Image.open(io.BytesIO(stored)).size == (40, 8)  # short_side policy keeps the aspect ratio
    import random
    crops = {decode(stored, spec, random.Random(i))[0, 0, 0].item() for i in range(20)}
    assert len(crops) > 3 and decode(stored, spec, None).shape == (3, 8, 8)


def make_shards_main(*argv: str):
    return make_shards.main(parse_config(make_shards.MakeShardsConfig, list(argv)))

def test_audio_is_a_preset_of_the_same_code(tmp_path):
    src = tmp_path / "wavs"
    src.mkdir()
    t = np.arange(int(16_000 * 1.5)) / 16_000
    for i, freq in enumerate((220.0, 440.0, 880.0)):
        stereo = np.stack([np.sin(2 * np.pi * freq * t)] * 2, axis=1) * 0.5  # (T, 2) at 16 kHz
        soundfile.write(src / f"tone{i}.wav", stereo, 16_000)
    (src / "bad.wav").write_bytes(b"RIFF nope")
    manifest = make_shards_main(f"--source={src}", f"--out={tmp_path / 'out'}", "--modality=audio",
                                "--sample_rate=8000", "--clip_seconds=0.5", "--val_fraction=0")
    assert manifest.counts == {"train": 3, "val": 0} and len(manifest.skipped) == 1 and manifest.class_names == []
    stored = next(iter_shard_samples(list_shards(tmp_path / "out", "train")[0]))[1]["wav"]
    wav, rate = soundfile.read(io.BytesIO(stored))
    assert rate == 8_000 and wav.ndim == 1 and abs(len(wav) - 12_000) <= 1  # mono, resampled, full length
    batch = next(iter(media_loader(tmp_path / "out", "train", batch_size=3, train=True, epoch_len=1)))
    assert batch.x.shape == (3, 1, 4_000) and batch.x.abs().max() <= 1.0 and batch.labels.tolist() == [-1] * 3
    with pytest.raises(ManifestError, match="no 'val' samples"):
        media_loader(tmp_path / "out", "val", batch_size=3, train=False)
    with pytest.raises(MediaError):
        normalise(b"RIFF nope", manifest.spec)


def test_cli_digits_defaults(tmp_path):
    manifest = make_shards_main("--source=digits", f"--out={tmp_path / 'd'}", "--shard_max_count=2000")
    assert manifest.class_names == [str(i) for i in range(10)] and sum(manifest.counts.values()) == 1_797
    assert manifest.spec.size == 16 and 100 < manifest.counts["val"] < 260
    batch = next(iter(media_loader(tmp_path / "d", "val", batch_size=5, train=False)))
    assert batch.x.shape == (5, 3, 16, 16) and batch.labels.min() >= 0
    with pytest.raises(UserError, match="--overwrite=true"):
        make_shards_main("--source=digits", f"--out={tmp_path / 'd'}")
