"""The converted official image tokenizer computes what the official code computes (tests/fixtures/official_simvq:
outputs of the official model on seeded, jittered weights), and the converter refuses what it cannot convert."""
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipelines import import_official, reconstruct
from pipelines.checkpoint import load_config, load_tokenizer
from tokenizer import build_tokenizer
from tokenizer.official import (FORMATS, OfficialFormatError, check_against, detect_format, generator_weights,
                                read_state_dict)
from tokenizer.official.image import dcr_to_pixel_shuffle
from helpers import OFFICIAL_FIXTURES, convert_official, official_fixture

FIXTURES = OFFICIAL_FIXTURES
STATE = FIXTURES / "image_small_state.safetensors"
IMAGE = FORMATS["image"]


@pytest.fixture(scope="module")
def official():
    return official_fixture("image")


def undo_permutation(sd):
    """The DCR -> PixelShuffle reordering of the upsampler convs, reverted (a negative control)."""
    phases = 4
    for k in [k for k in sd if k.endswith((".conv.weight", ".conv.bias")) and k.startswith("decoder.levels")]:
        sd[k] = sd[k].reshape(sd[k].shape[0] // phases, phases, *sd[k].shape[1:]).transpose(0, 1).reshape(sd[k].shape)


def converted_model(state, ema=True, permute=True, norm_groups=None):
    net = {} if norm_groups is None else {"norm_groups": norm_groups}
    return convert_official("image", state, ema, net, edit=None if permute else undo_permutation)[0]


def run_official_io(model, x):
    with torch.no_grad():
        z = model.encoder(x)
        q = model.quantizer(z)
        return {"z": z, "indices": q.codes, "z_q": q.z_q, "commit_loss": q.loss, "x_rec": model.decode(q.codes),
                "codebook": model.quantizer.codebook}


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("ema", [True, False])
def test_converted_model_reproduces_the_official_outputs(official, ema):
    state, io = official
    suffix = "" if ema else "_raw"
    out = run_official_io(converted_model(state, ema=ema), io["x"])
    assert torch.equal(out["indices"], io["indices" + suffix])
    assert max_diff(out["z"], io["z" + suffix]) < 1e-5
    assert max_diff(out["x_rec"], io["x_rec" + suffix]) < 1e-4 * io["x_rec" + suffix].abs().max().item()
    if ema:  # the fixture holds these for the EMA weights only
        assert max_diff(out["codebook"], io["codebook"]) < 1e-6
        assert max_diff(out["z_q"], io["z_q"]) < 1e-5
        assert abs(out["commit_loss"].item() - io["commit_loss"].item()) < 1e-5 * io["commit_loss"].item()


@pytest.mark.parametrize("variant", ["raw weights", "no channel permutation", "project group count"])
def test_negative_controls_fail(official, variant):
    """Each known difference, left out, breaks the parity: the checks above can fail."""
    state, io = official
    model = {"raw weights": lambda: converted_model(state, ema=False),
             "no channel permutation": lambda: converted_model(state, permute=False),
             "project group count": lambda: converted_model(state, norm_groups=0)}[variant]()
    out = run_official_io(model, io["x"])
    scale = io["x_rec"].abs().max().item()
    assert max_diff(out["x_rec"], io["x_rec"]) > 1e-2 * scale
    if variant != "no channel permutation":  # the permutation only touches the decoder
        assert not torch.equal(out["indices"], io["indices"])


def test_dcr_permutation_matches_depth_to_space():
    """Rows permuted by dcr_to_pixel_shuffle, then nn.PixelShuffle == TensorFlow's DCR depth-to-space of the rows as
    they were (written out directly here)."""
    C, r, H, W = 3, 2, 2, 3
    x = torch.randn(1, C * r * r, H, W)
    dcr = x.view(1, r, r, C, H, W).permute(0, 3, 4, 1, 5, 2).reshape(1, C, H * r, W * r)
    ours = torch.nn.functional.pixel_shuffle(dcr_to_pixel_shuffle(x[0], r, 2)[None], r)
    assert torch.equal(ours, dcr)
    assert not torch.equal(torch.nn.functional.pixel_shuffle(x, r), dcr)


def test_inferred_config_of_the_small_fixture(official):
    cfg = IMAGE.infer_config(generator_weights(official[0], IMAGE.prefixes))
    assert (cfg.arch, cfg.size, cfg.num_codes, cfg.dims, cfg.in_channels) == ("conv", "b", 1024, 2, 3)
    assert cfg.net == {"ch": 32, "ch_mult": [1, 2, 2], "z_channels": 32, "conv_bias": False, "norm_groups": 32}


@pytest.mark.parametrize("num_codes", [1024, 262144])
def test_released_key_layout_converts_to_size_b(num_codes):
    """Every key and shape of the released 128x128 checkpoint (image_released_keys.json), zero-filled, converts onto
    the `b` size with only the two official details overridden; K comes from the codebook's shape."""
    keys = json.loads((FIXTURES / "image_released_keys.json").read_text())["keys"]
    with torch.device("meta"):
        state = {k: torch.zeros(v["shape"]) for k, v in keys.items()}
        state["quantize.embedding.weight"] = torch.zeros(num_codes, 128)
        weights = generator_weights(state, IMAGE.prefixes)
        cfg = IMAGE.infer_config(weights)
        assert (cfg.size, cfg.num_codes, cfg.net) == ("b", num_codes, {"conv_bias": False, "norm_groups": 32})
        check_against(IMAGE.convert(weights, cfg), build_tokenizer(cfg).state_dict(), "released")
    assert not any(k.startswith("loss.") for k in weights)


def test_import_official_round_trip_through_reconstruct(official, tmp_path, digits_shards):
    """convert -> project checkpoint -> load_tokenizer (what reconstruct, encode_shards and sample use) gives the
    official reconstruction; reconstruct runs on it; the source is recorded."""
    state, io = official
    out = import_official.main(import_official.ImportOfficialConfig(ckpt=str(STATE), out=str(tmp_path / "tok")))
    model, _ = load_tokenizer(out)
    with torch.no_grad():
        assert torch.equal(model.encode(io["x"]), io["indices"])
        assert max_diff(model(io["x"]).x_hat, io["x_rec"]) < 1e-4 * io["x_rec"].abs().max().item()
    source = load_config(out)["source"]
    assert source["weights"] == "ema" and source["format"] == "image"
    assert source["sha256"] == __import__("hashlib").sha256(STATE.read_bytes()).hexdigest()
    metrics = reconstruct.main(reconstruct.ReconstructConfig(tokenizer=str(out), data=str(digits_shards),
                                                             out=str(tmp_path / "recon"), usage_split=""))
    assert torch.isfinite(torch.tensor(metrics["val/psnr"]))


def lightning_ckpt(state, **extra):
    return {"state_dict": dict(state), "epoch": 3, "global_step": 1000, **extra}


class HParams:  # a harmless foreign class: refused by default, read as inert data on request
    def __init__(self):
        self.lr = 1e-4


class Foreign:  # stands for a class a Lightning checkpoint pickles (hyper-parameters, omegaconf nodes)
    def __init__(self):
        self.lr = 1e-4

    def __reduce__(self):  # what a malicious file would do: run code at load time
        return (subprocess.call, (["touch", "/tmp/simvq-pwned"],))


def test_reads_lightning_ckpt_and_plain_state_dict(official, tmp_path):
    state = official[0]
    torch.save(lightning_ckpt(state), tmp_path / "a.ckpt")
    torch.save(dict(state), tmp_path / "b.pt")
    for f in ("a.ckpt", "b.pt"):
        got = read_state_dict(tmp_path / f)
        assert set(got) == set(state) and torch.equal(got["encoder.conv_in.weight"], state["encoder.conv_in.weight"])


def test_refuses_pickled_objects_unless_inert(official, tmp_path):
    torch.save(lightning_ckpt(official[0], hyper_parameters=HParams()), tmp_path / "h.ckpt")
    with pytest.raises(OfficialFormatError, match=r"HParams.*--inert=true"):
        read_state_dict(tmp_path / "h.ckpt")
    assert set(read_state_dict(tmp_path / "h.ckpt", inert=True)) == set(official[0])


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_never_runs_code_from_a_pickle(official, tmp_path):
    marker = Path("/tmp/simvq-pwned")
    marker.unlink(missing_ok=True)
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump(lightning_ckpt({}, hyper_parameters=Foreign()), f)
    for inert in (False, True):
        with pytest.raises(OfficialFormatError):
            read_state_dict(tmp_path / "evil.ckpt", inert=inert)
    assert not marker.exists()


def test_refuses_half_ema_and_missing_ema(official, tmp_path):
    state = dict(official[0])
    half = {k: v for k, v in state.items() if k != "model_ema.decoderconv_outweight"}
    with pytest.raises(OfficialFormatError, match="half-EMA.*decoder.conv_out.weight"):
        generator_weights(half, IMAGE.prefixes)
    no_ema = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
    with pytest.raises(OfficialFormatError, match="no EMA weights.*--raw=true"):
        generator_weights(no_ema, IMAGE.prefixes)
    assert set(generator_weights(no_ema, IMAGE.prefixes, ema=False)) == set(no_ema)


def test_cli_errors_are_one_line(tmp_path, official):
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    cases = {"other.safetensors": "not an official SimVQ tokenizer", "junk.ckpt": "not a readable checkpoint",
             "missing.ckpt": "no such file"}
    for name, message in cases.items():
        proc = subprocess.run([sys.executable, "-m", "pipelines.import_official", f"--ckpt={tmp_path / name}",
                               f"--out={tmp_path / 'o'}"], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, \
            proc.stderr
    assert detect_format(official[0]) == "image"
