"""data/media.py's modality registry: dims, channels, input shape, file format, and writing a sample back to the file a
person opens (PNG | 16-bit WAV) through the one uint8 and the one int16 conversion. Round trips first: what a writer
puts in a file is exactly what a decoder reads back."""
import io

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from data.builtin import folder
from data.errors import UserError
from data.media import (MODALITIES, MediaSpec, decode, modality_of, normalise, to_file_bytes, to_int16, to_integers,
                        to_uint8)
from data.shards import write_media_shards
from pipelines import train_tokenizer
from pipelines.config import parse_config

IMAGE, AUDIO = MediaSpec("image", size=8), MediaSpec("audio", sample_rate=8_000, clip_seconds=0.25)


def test_registry_knows_dims_channels_shape_and_extension():
    assert (IMAGE.dims, IMAGE.channels, IMAGE.input_shape, IMAGE.extension) == (2, 3, (3, 8, 8), "png")
    assert (AUDIO.dims, AUDIO.channels, AUDIO.input_shape, AUDIO.extension) == (1, 1, (1, 2_000), "wav")
    assert modality_of(2, 3) == "image" and modality_of(1, 1) == "audio" and modality_of(2, 1) is None
    assert {m.field for m in MODALITIES.values()} == {"png", "wav"}


def test_decoded_samples_have_the_registry_input_shape():
    """The shape a model is built for (encode_shards' code grid) is the shape the reader decodes."""
    png = io.BytesIO()
    Image.new("RGB", (12, 9), (10, 200, 30)).save(png, format="PNG")
    assert decode(normalise(png.getvalue(), IMAGE), IMAGE, rng=None).shape == IMAGE.input_shape
    wav = io.BytesIO()
    tone = 0.1 * np.sin(np.arange(3_000) / 10, dtype=np.float32)  # a silent file would be a counted skip
    soundfile.write(wav, np.stack([tone, tone], 1), 16_000, format="WAV")
    assert decode(normalise(wav.getvalue(), AUDIO), AUDIO, rng=None).shape == AUDIO.input_shape


def test_to_uint8_rounds_like_fid_always_did():
    x = torch.tensor([-1.2, -1.0, -0.99, 0.0, 0.5, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 1, 128, 191, 255, 255]  # ((x.clamp + 1) * 127.5).round()
    assert to_integers(x, IMAGE).dtype == torch.uint8 and to_integers(x, AUDIO).dtype == torch.int16


def test_png_round_trip_is_the_uint8_of_the_tensor():
    x = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) * 2.4 - 1.2  # out of range values too
    data = to_file_bytes(x, IMAGE)
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG" and img.mode == "RGB" and img.size == (7, 5)
    assert torch.equal(torch.from_numpy(np.array(img)).permute(2, 0, 1), to_uint8(x))
    # the same bytes the sample writer made before the registry (PIL's PNG defaults on the uint8 pixels)
    old = io.BytesIO()
    Image.fromarray(to_uint8(x).permute(1, 2, 0).numpy()).save(old, format="PNG")
    assert data == old.getvalue()


def test_wav_round_trip_is_the_int16_of_the_tensor():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(1, 1_000, generator=g) * 2.4 - 1.2, torch.randn(1, 1_000, generator=g) * 1e-6,
                   torch.tensor([[-1.0, 1.0, 0.0, 0.5, -0.5]])], dim=1)
    data = to_file_bytes(x, AUDIO)
    info = soundfile.info(io.BytesIO(data))
    assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "PCM_16", 8_000, 1)
    pcm, _ = soundfile.read(io.BytesIO(data), dtype="int16")
    assert torch.equal(torch.from_numpy(pcm), to_int16(x[0]))
    assert to_int16(torch.tensor([-1.0, 1.0, 0.0, 0.5, 2.0])).tolist() == [-32768, 32767, 0, 16384, 32767]


def test_to_int16_is_what_libsndfile_writes_for_float_audio():
    """The shard writer used to hand floats to libsndfile; it now writes to_int16's integers, so the two must agree
    to the bit for audio shards to stay byte-identical (tiny values are where a plain floor or round differs)."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.rand(20_000, generator=g) * 2 - 1, torch.randn(20_000, generator=g) * 1e-7,
                   torch.tensor([-1.0, 1.0, 0.0, 1e-10, -1e-10, 2.0**-17, -(2.0**-17), -(2.0**-48)])])
    buf = io.BytesIO()
    soundfile.write(buf, x.numpy(), 8_000, subtype="PCM_16", format="WAV")
    pcm, _ = soundfile.read(io.BytesIO(buf.getvalue()), dtype="int16")
    assert torch.equal(torch.from_numpy(pcm), to_int16(x))


def test_to_file_bytes_refuses_a_sample_of_another_shape():
    with pytest.raises(ValueError, match=r"got shape \(1, 8, 8\)"):
        to_file_bytes(torch.zeros(1, 8, 8), IMAGE)
    with pytest.raises(ValueError, match=r"got shape \(2, 1, 100\)"):
        to_file_bytes(torch.zeros(2, 1, 100), AUDIO)  # a batch, not one sample


@pytest.fixture
def audio_shards(tmp_path):
    (tmp_path / "wavs").mkdir()
    for i in range(4):
        soundfile.write(tmp_path / "wavs" / f"{i}.wav", 0.1 * np.sin(np.arange(2_000, dtype=np.float32) / 5), 8_000)
    write_media_shards(folder(tmp_path / "wavs", "audio"), tmp_path / "shards", AUDIO, val_fraction=0.0,
                       log=lambda *a: None)
    return tmp_path / "shards"


def test_train_tokenizer_refuses_a_model_of_other_dims_or_channels(audio_shards, tmp_path):
    argv = [f"--data={audio_shards}", f"--out={tmp_path / 'tok'}", "--loop.steps=1"]
    with pytest.raises(UserError) as refused:  # the default model is a 2-D RGB one
        train_tokenizer.main(parse_config(train_tokenizer.TrainTokenizerConfig, argv))
    message = str(refused.value)
    assert "\n" not in message and str(audio_shards) in message and "--model.dims=2" in message
    assert "--model.dims=1 --model.in_channels=1" in message  # the fix
    assert not (tmp_path / "tok").exists()  # refused before anything was written
    with pytest.raises(UserError, match="--model.in_channels=1"):
        train_tokenizer.main(parse_config(train_tokenizer.TrainTokenizerConfig,
                                          argv + ["--model.dims=1", "--model.in_channels=3"]))
