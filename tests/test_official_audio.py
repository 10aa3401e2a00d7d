"""The converted official audio tokenizer computes what the official code computes (tests/fixtures/official_simvq:
outputs of the official SEANet -> SimVQ1D -> Vocos -> iSTFT generator on seeded, jittered small weights), the
controls that must fail do, and the released layout converts."""
import json
import subprocess
import sys

import pytest
import torch

from pipelines.checkpoint import load_tokenizer
from tokenizer import build_tokenizer
from tokenizer.official import FORMATS, OfficialFormatError, check_against, detect_format, generator_weights
from helpers import OFFICIAL_FIXTURES, convert_official, official_fixture

FIXTURES = OFFICIAL_FIXTURES
STATE = FIXTURES / "audio_small_state.safetensors"
AUDIO = FORMATS["audio"]


@pytest.fixture(scope="module")
def official():
    return official_fixture("audio")


def converted(state, ema=True, **net):
    """(model in eval mode, its config) from the official weights, `net` fields replaced after inference."""
    return convert_official("audio", state, ema, net)


def run_io(model, x):
    with torch.no_grad():
        z = model.encoder(x)
        q = model.quantizer(z)
        backbone = model.decoder.backbone(q.z_q)
        return {"z": z, "indices": q.codes, "z_q": q.z_q, "codebook": model.quantizer.codebook,
                "backbone_out": backbone, "x_rec": model.decoder.head(backbone).unsqueeze(1),
                "commit_loss": q.loss, "decoded": model.decode(q.codes)}


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


# Float rounding only: the fixture was made in fp32 by other kernels (max |diff| seen: z 1.9e-7, backbone_out 5.5e-6
# on values up to 5.3, x_rec 1.5e-7).
TOLERANCE = {"z": 1e-6, "z_q": 1e-5, "codebook": 1e-6, "backbone_out": 1e-5, "x_rec": 1e-5, "commit_loss": 1e-6}


def test_infers_the_fixture_config(official):
    weights = generator_weights(official[0], AUDIO.prefixes, frozen=AUDIO.frozen)
    assert not any(k.startswith("decoder.") for k in weights)  # the SEANet decoder decode() never calls
    cfg = AUDIO.infer_config(weights)
    assert (cfg.arch, cfg.size, cfg.dims, cfg.in_channels, cfg.quantizer, cfg.num_codes) == (
        "seanet-vocos", "paper", 1, 1, "simvq", 512)
    assert cfg.net == {"n_filters": 4, "z_channels": 64, "weight_norm": False, "dim": 64, "intermediate_dim": 192,
                       "num_layers": 2}  # strides 2,4,5,8, causal, 1 residual unit, 2 LSTM layers, n_fft 1280: paper's
    assert json.loads(json.dumps(cfg.net)) == cfg.net and cfg.simvq.bias and cfg.simvq.codebook_dim == 0


@pytest.mark.parametrize("ema", [True, False])
def test_converted_model_reproduces_the_official_outputs(official, ema):
    state, io = official
    model, _ = converted(state, ema=ema)
    out = run_io(model, io["x"])
    suffix = "" if ema else "_raw"
    assert torch.equal(out["indices"], io["indices" + suffix])
    names = [n for n in TOLERANCE if n + suffix in io]  # the fixture has z, indices and x_rec for the raw weights
    assert len(names) == (6 if ema else 2)
    for name in names:
        assert max_diff(out[name], io[name + suffix]) < TOLERANCE[name], name
    # Decoding the codes (through W(C)) gives the same reconstruction: decode never re-quantizes.
    assert max_diff(out["decoded"], io["x_rec" + suffix]) < TOLERANCE["x_rec"]


def test_weight_norm_kept_as_a_parametrisation_computes_the_same(official):
    state, io = official
    model, _ = converted(state, weight_norm=True)  # (g, v) loaded into parametrizations, not folded
    assert any(k.endswith("parametrizations.weight.original1") for k in model.state_dict())
    out = run_io(model, io["x"])
    assert torch.equal(out["indices"], io["indices"]) and max_diff(out["x_rec"], io["x_rec"]) < 1e-5


def test_negative_controls_fail(official):
    """Each would pass for a looser test; each must miss the official outputs by far more than the tolerance."""
    state, io = official
    raw, _ = converted(state, ema=False)
    assert max_diff(run_io(raw, io["x"])["x_rec"], io["x_rec"]) > 1e-3  # raw weights vs the EMA outputs

    weights = generator_weights(state, AUDIO.prefixes, frozen=AUDIO.frozen)
    cfg = AUDIO.infer_config(weights)
    # v used as the weight (weight norm not applied): g := ||v|| makes the fold g * v / ||v|| return v itself
    unnormed = {k: weights[k[:-1] + "v"].flatten(1).norm(dim=1).view_as(v) if k.endswith("weight_g") else v
                for k, v in weights.items()}
    bad = build_tokenizer(cfg).eval()
    bad.load_state_dict(AUDIO.convert(unnormed, cfg))
    assert max_diff(run_io(bad, io["x"])["z"], io["z"]) > 1e-2

    non_causal, _ = converted(state, causal=False)  # causal-ness is in no shape: the outputs pin it
    out = run_io(non_causal, io["x"])
    assert max_diff(out["z"], io["z"]) > 1e-2 and not torch.equal(out["indices"], io["indices"])

    # torch.istft(center=True) instead of the hand-made "same" padding, on the very spectrum the head computes
    head = converted(state)[0].decoder.head
    with torch.no_grad():
        x = head.out(io["backbone_out"]).transpose(1, 2)
        log_mag, phase = x.chunk(2, dim=1)
        mag = log_mag.exp().clamp(max=1e2)
        spec = torch.complex(mag * phase.cos(), mag * phase.sin())
        centred = torch.istft(spec, head.n_fft, head.hop, window=head.window, center=True, length=6400)
        assert max_diff(head.istft(spec).unsqueeze(1), io["x_rec"]) < 1e-5
    assert max_diff(centred.unsqueeze(1), io["x_rec"]) > 1e-2


def test_detects_audio_and_refuses_a_foreign_window(official):
    state = official[0]
    assert detect_format(state) == "audio"
    with pytest.raises(OfficialFormatError, match="half-EMA.*head.istft.window"):
        generator_weights(state, AUDIO.prefixes)  # without the window among the frozen tensors
    weights = generator_weights(state, AUDIO.prefixes, frozen=AUDIO.frozen)
    cfg = AUDIO.infer_config(weights)
    with pytest.raises(OfficialFormatError, match="Hann window"):
        AUDIO.convert({**weights, "head.istft.window": torch.hann_window(1280, periodic=False)}, cfg)


def released_state(num_codes: int) -> dict[str, torch.Tensor]:
    """Every key of the released checkpoint (generator, losses, EMA shadows) at its shape, zero-filled without
    allocating (an expanded 0-d zero); the window is the real Hann window, which the converter checks."""
    layout = json.loads((FIXTURES / "audio_released_keys.json").read_text())["keys"]
    state = {k: torch.zeros((), dtype=getattr(torch, v["dtype"])).expand(v["shape"]) for k, v in layout.items()}
    state["head.istft.window"] = torch.hann_window(1280)
    state["quantize.embedding.weight"] = torch.zeros(()).expand(num_codes, 512)
    return state


def test_released_layout_converts_to_the_paper_size():
    state = released_state(1024)
    assert detect_format(state) == "audio"
    weights = generator_weights(state, AUDIO.prefixes, frozen=AUDIO.frozen)
    cfg = AUDIO.infer_config(weights)
    assert (cfg.size, cfg.net, cfg.num_codes, cfg.in_channels) == ("paper", {"weight_norm": False}, 1024, 1)
    check_against(AUDIO.convert(weights, cfg), build_tokenizer(cfg).state_dict(), "the released layout")
    for k in (4096, 262_144):  # other releases differ only in the frozen codebook
        weights = generator_weights(released_state(k), AUDIO.prefixes, frozen=AUDIO.frozen)
        assert AUDIO.infer_config(weights).num_codes == k


def test_import_official_command_on_the_audio_fixture(official, tmp_path):
    out = tmp_path / "tok"
    proc = subprocess.run([sys.executable, "-m", "pipelines.import_official", f"--ckpt={STATE}", f"--out={out}"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["format"], report["arch"], report["downsample_factor"], report["num_codes"]) == (
        "audio", "seanet-vocos", 320, 512)
    model, _ = load_tokenizer(out)
    io = official[1]
    with torch.no_grad():
        codes = model.encode(io["x"])
        assert torch.equal(codes, io["indices"])
        assert max_diff(model.decode(codes), io["x_rec"]) < 1e-5
