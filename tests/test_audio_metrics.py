"""Audio metrics as codec projects test them (AUDIO_SPEC §7): identity anchors (PESQ 4.64, STOI 1, mel 0, V/UV F1 1),
clean > low-pass > noise for every metric, independent cross-checks, counted failures, and the codec baselines.

Speech-like clips come from espeak-ng when installed, else a synthetic vowel signal (tests/helpers.py). The library
metrics run once per degradation (module fixture) with CREPE "tiny" to keep the file well under a minute.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data.errors import UserError
from helpers import speech_clips
from pipelines.metrics import codecs
from pipelines.metrics.audio import DAC_MEL_CLAMP, DAC_MEL_SCALES, mel_distance, si_sdr, snr, stft_distance
from pipelines.metrics.codecs import codec2_round_trip, opus_round_trip
from pipelines.metrics.speech import MIN_SECONDS, speech_metrics

RATE = 24000
LIBRARY_METRICS = ("pesq", "stoi", "visqol", "vuv_f1")


def lowpass(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Zero-phase low-pass (FFT mask, 200 Hz cosine roll-off): it removes bandwidth without shifting anything."""
    spectrum = torch.fft.rfft(x.double())
    freqs = torch.fft.rfftfreq(x.shape[-1], 1 / RATE)
    mask = (0.5 + 0.5 * torch.cos(torch.pi * ((freqs - cutoff) / 200).clamp(0, 1))).double()
    return torch.fft.irfft(spectrum * mask, n=x.shape[-1]).to(x.dtype)


def add_noise(x: torch.Tensor, snr_db: float) -> torch.Tensor:
    """White noise at `snr_db` below each clip's power."""
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    power = x.pow(2).mean(-1, keepdim=True)
    return x + noise * (power / 10 ** (snr_db / 10)).sqrt()


@pytest.fixture(scope="module")
def clean() -> torch.Tensor:
    clips, _ = speech_clips(RATE, count=2)
    return torch.from_numpy(clips)[:, None]  # (2, 1, T)


@pytest.fixture(scope="module")
def variants(clean) -> dict[str, torch.Tensor]:
    return {"clean": clean, "lowpass": lowpass(clean, 2000.0), "noise": add_noise(clean, 0.0)}


@pytest.fixture(scope="module")
def scores(clean, variants) -> dict[str, dict[str, float]]:
    """variant -> metric -> mean over the clips, the library metrics and every torch metric (V/UV F1 only for clean
    and noise: CREPE is the slowest metric here)."""
    out = {}
    for name, deg in variants.items():
        which = LIBRARY_METRICS if name != "lowpass" else ("pesq", "stoi", "visqol")
        speech = speech_metrics(clean, deg, RATE, which=which, crepe_model="tiny")
        assert all(s.count == clean.shape[0] and not s.failures for s in speech.values()), speech
        out[name] = {k: s.mean for k, s in speech.items()}
        out[name].update(mel=float(mel_distance(clean, deg, RATE).mean()), si_sdr=float(si_sdr(clean, deg).mean()),
                         stft=float(stft_distance(clean, deg).mean()))
    return out


def test_clips_are_long_enough(clean):
    assert clean.shape[-1] / RATE >= max(MIN_SECONDS.values())  # else every library metric would be skipped


def test_identity_anchors(clean, scores):
    ident = scores["clean"]
    assert ident["pesq"] == pytest.approx(4.64, abs=0.01)
    assert ident["stoi"] == pytest.approx(1.0, abs=1e-6)
    assert ident["vuv_f1"] == 1.0
    assert 3.9 < ident["visqol"] < 4.9  # the lattice mapper: 4.0-4.5 for identity; the polynomial one gives 5.0
    assert mel_distance(clean, clean.clone(), RATE).eq(0).all()  # exactly 0, not merely small
    assert stft_distance(clean, clean.clone()).eq(0).all()
    assert ident["si_sdr"] > 100
    shifted = torch.roll(clean, 1, dims=-1)  # negative control: one sample off is not identical
    assert (mel_distance(clean, shifted, RATE) > 0).all() and (stft_distance(clean, shifted) > 0).all()


# Not stft_distance: its log-magnitude term punishes a band that is removed outright (log of ~0) more than broadband
# noise, so a brick-wall low-pass scores worse than 5 dB noise there; it is checked for identity only.
@pytest.mark.parametrize("metric, higher_is_better", [("pesq", True), ("stoi", True), ("visqol", True),
                                                      ("si_sdr", True), ("mel", False)])
def test_clean_beats_lowpass_beats_noise(scores, metric, higher_is_better):
    values = [scores[v][metric] for v in ("clean", "lowpass", "noise")]
    expected = sorted(values, reverse=higher_is_better)
    assert values == expected and len(set(values)) == 3, f"{metric}: clean, lowpass, noise = {values}"


def test_vuv_f1_drops_for_noise(scores):
    assert scores["noise"]["vuv_f1"] < 0.99 < scores["clean"]["vuv_f1"]


def test_mel_distance_matches_librosa():
    """DAC's recipe rebuilt in numpy with librosa's STFT and (Slaney) mel filters, as DAC's audiotools does."""
    librosa = pytest.importorskip("librosa")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 1, 3000, generator=g) * 0.3, torch.randn(2, 1, 3000, generator=g) * 0.3
    expected = np.zeros(2)
    for window, n_mels in DAC_MEL_SCALES:
        fbank = librosa.filters.mel(sr=RATE, n_fft=window, n_mels=n_mels, fmin=0.0, fmax=None)  # (M, F)

        def logmel(a):
            mag = np.abs(librosa.stft(a.numpy()[:, 0], n_fft=window, hop_length=window // 4, window="hann",
                                      center=True, pad_mode="reflect"))  # (B, F, frames)
            return np.log10(np.maximum(np.einsum("mf,bft->bmt", fbank, mag), DAC_MEL_CLAMP))

        expected += np.abs(logmel(x) - logmel(y)).mean(axis=(1, 2))
    assert mel_distance(x, y, RATE).numpy() == pytest.approx(expected, rel=1e-4)


def test_si_sdr_known_value_and_gain_invariance():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 1, 8000, generator=g)
    x = x - x.mean()
    e = torch.randn(1, 1, 8000, generator=g)
    e = e - e.mean()
    e = e - (e * x).sum() / x.pow(2).sum() * x  # orthogonal to x: exactly the distortion SI-SDR sees
    e = e * (x.norm() / e.norm() / 10)  # 20 dB below x
    assert float(si_sdr(x, x + e)) == pytest.approx(20.0, abs=1e-3)
    assert float(si_sdr(x, 0.3 * (x + e))) == pytest.approx(20.0, abs=1e-3)  # a gain is not an error...
    assert float(snr(x, 0.3 * (x + e))) < 5  # ...while plain SNR counts it (negative control)


def test_short_clips_are_skipped_and_counted(clean):
    short = clean[..., : RATE]  # 1 s: long enough for CREPE, too short for PESQ, STOI and ViSQOL
    res = speech_metrics(short, short, RATE, which=("pesq", "stoi", "visqol"))
    for name in ("pesq", "stoi", "visqol"):
        assert res[name].count == 0 and sorted(res[name].failures) == [0, 1]
        assert "shorter than" in res[name].failures[0] and math.isnan(res[name].mean)
        assert res[name].values == [None, None]
    assert res["pesq"].summary("pesq") == {"pesq": pytest.approx(math.nan, nan_ok=True), "pesq_count": 0.0,
                                           "pesq_failures": 2.0}
    vuv = speech_metrics(short[:1], short[:1], RATE, which=("vuv_f1",), crepe_model="tiny")["vuv_f1"]
    assert vuv.values == [1.0] and not vuv.failures  # the negative control: 1 s is enough for CREPE


def test_failed_clip_is_recorded_not_averaged(clean):
    """A silent reference: PESQ finds no utterance. The failure is listed; the mean is the other clip's value."""
    ref = clean.clone()
    ref[1] = 0.0
    res = speech_metrics(ref, clean, RATE, which=("pesq",))["pesq"]
    assert list(res.failures) == [1] and "pesq" in res.failures[1]
    assert res.count == 1 and res.values[1] is None and res.mean == res.values[0] == pytest.approx(4.64, abs=0.3)


def test_bad_requests_are_user_errors(clean):
    with pytest.raises(UserError, match="unknown metric"):
        speech_metrics(clean, clean, RATE, which=("mos",))
    with pytest.raises(UserError, match="utmos_path"):
        speech_metrics(clean, clean, RATE, which=("utmos",))
    with pytest.raises(UserError, match="does not exist"):
        speech_metrics(clean, clean, RATE, which=("utmos",), utmos_path="/nonexistent/utmos.pt")
    with pytest.raises(UserError, match="equal shape"):
        speech_metrics(clean, clean[..., :-1], RATE, which=("stoi",))


class _LoudnessMos(torch.nn.Module):
    """A stand-in for the UTMOS TorchScript file: (B, T) 16 kHz waves -> (B,) 'MOS' = 1 + 4 * RMS."""

    def forward(self, wavs: torch.Tensor) -> torch.Tensor:
        return 1 + 4 * wavs.pow(2).mean(-1).sqrt()


def test_utmos_runs_a_local_torchscript_file(clean, tmp_path):
    path = tmp_path / "utmos.pt"
    torch.jit.script(_LoudnessMos()).save(str(path))
    res = speech_metrics(clean, clean * 0.5, RATE, which=("utmos",), utmos_path=path)["utmos"]
    rms16 = [float(c.pow(2).mean().sqrt()) for c in clean * 0.5]  # resampling to 16 kHz keeps the RMS of speech
    assert res.count == 2 and res.values == pytest.approx([1 + 4 * r for r in rms16], rel=0.02)


def _require(*tools: str) -> None:
    for tool in tools:
        try:
            codecs.require_tool(tool)
        except UserError as e:
            pytest.skip(str(e))


def test_codec_round_trips_keep_length_and_rank(clean):
    _require("opusenc", "opusdec", "c2enc", "c2dec")
    x = clean[..., : clean.shape[-1] - 123]  # an odd length: the output must match it exactly
    opus, c2 = opus_round_trip(x, RATE, 12), codec2_round_trip(x, RATE, 1200)
    assert opus.shape == c2.shape == x.shape
    pesq_opus = speech_metrics(x, opus, RATE, which=("pesq",))["pesq"].mean
    pesq_c2 = speech_metrics(x, c2, RATE, which=("pesq",))["pesq"].mean
    assert 4.0 > pesq_opus > pesq_c2 + 1.0 > 2.0, (pesq_opus, pesq_c2)


def test_codec2_delay_is_removed(clean):
    _require("c2enc", "c2dec")
    x = clean[:1]
    y = codec2_round_trip(x, RATE, 3200)
    a, b = x.flatten().double().numpy(), y.flatten().double().numpy()
    lags = range(-240, 241)  # +-10 ms at 24 kHz
    corr = [np.dot(a[max(0, -k): len(a) - max(0, k)], b[max(0, k): len(b) - max(0, -k)]) for k in lags]
    assert abs(lags[int(np.argmax(corr))]) <= 8  # within a third of a millisecond


def test_delay_estimate_finds_a_known_shift():
    ref = np.random.default_rng(3).standard_normal(4000)
    assert codecs._delay(ref, np.concatenate([np.zeros(37), ref]), 200) == 37
    assert codecs._delay(ref, ref, 200) == 0


def test_missing_codec_tool_names_the_apt_package(clean, monkeypatch):
    monkeypatch.setattr(codecs.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="apt-get install -y opus-tools"):
        opus_round_trip(clean, RATE, 12)
    with pytest.raises(UserError, match="apt-get install -y codec2"):
        codec2_round_trip(clean, RATE, 1200)
