"""Perceptual and speech metrics of reconstructed audio, through their reference libraries, one value per clip.

    scores = speech_metrics(ref, deg, sample_rate=24000, which=("pesq", "stoi", "visqol", "vuv_f1"))
    scores["pesq"].mean, scores["pesq"].count, scores["pesq"].failures  # {clip index: reason}

Clips are (B, 1, T) in [-1, 1], reference first, as in `audio.py`. What each metric runs (AUDIO_SPEC §3):
- `pesq`: ITU-T P.862.2 wide-band PESQ (`pesq` package) at 16 kHz, both clips resampled first. Identity = 4.64.
- `stoi`: STOI (`pystoi`) at the clips' own rate (it resamples to 10 kHz itself), as the paper calls it.
- `visqol`: ViSQOL v3 speech mode (`visqol-python`, its bundled models) at 16 kHz with the deep-lattice MOS mapper,
  the C++ default; the polynomial fallback scores 1-2 points higher, so it is never used silently.
- `vuv_f1`: F1 of the voiced/unvoiced decision per 10 ms frame, reference as truth (the paper, after CARGAN): CREPE
  (`torchcrepe`, "full" for reports, "tiny" in tests) at 16 kHz, fmin 50, fmax 550, periodicity forced to 0 where
  the A-weighted loudness is under -60 dB, and a frame is voiced when its periodicity reaches 0.21.
- `utmos`: the UTMOS22 strong learner, only from a local TorchScript file (`utmos_path`); nothing is downloaded.

Failures are recorded per clip with their reason and never averaged in: the paper scores a failed PESQ as -1 and
averages it, which mixes "the library refused" with "bad audio". A clip shorter than MIN_SECONDS[metric] is skipped
the same way: PESQ, STOI and ViSQOL need about 2 s to say anything (pystoi returns 1e-5 under ~0.8 s), so a
1-s clip gets no score rather than a meaningless one.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pesq as pesq_lib
import pystoi
import torch
import torchaudio
import torchcrepe
from visqol import VisqolApi

from data.errors import UserError

SPEECH_METRICS = ("pesq", "stoi", "visqol", "vuv_f1", "utmos")
DEFAULT_METRICS = ("pesq", "stoi", "visqol", "vuv_f1")  # utmos needs a checkpoint path
METRIC_RATE = 16000  # PESQ-wb, ViSQOL speech, CREPE and UTMOS all work at 16 kHz
MIN_SECONDS = {"pesq": 2.0, "stoi": 2.0, "visqol": 2.0, "vuv_f1": 0.5, "utmos": 0.5}
STOI_FAILED = 1e-5  # pystoi's return value when too few non-silent frames remain
CREPE_MODELS = ("tiny", "full")  # the two capacities whose weights ship in the torchcrepe wheel
CREPE_HOP = 160       # 10 ms at 16 kHz
CREPE_FMIN, CREPE_FMAX = 50.0, 550.0
SILENCE_DB = -60.0    # frames quieter than this are unvoiced whatever CREPE says
VOICED_PERIODICITY = 0.21


class ClipFailure(Exception):
    """One clip that a metric could not score; the message is the recorded reason."""


@dataclass
class SpeechScores:
    """One metric over a batch: `values[i]` is clip i's score or None, and then `failures[i]` says why."""
    values: list[float | None] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Clips that were scored."""
        return sum(v is not None for v in self.values)

    @property
    def mean(self) -> float:
        """Mean over the scored clips only; NaN when none was scored."""
        scored = [v for v in self.values if v is not None]
        return sum(scored) / len(scored) if scored else math.nan

    def extend(self, other: SpeechScores) -> None:
        """Append another batch's clips (indices of its failures shift by the clips already held)."""
        offset = len(self.values)
        self.values += other.values
        self.failures.update({offset + i: reason for i, reason in other.failures.items()})

    def summary(self, name: str) -> dict[str, float]:
        """Flat numbers for metrics.json: `<name>`, `<name>_count`, `<name>_failures`."""
        return {name: self.mean, f"{name}_count": float(self.count), f"{name}_failures": float(len(self.failures))}


def pesq_wb(ref16: np.ndarray, deg16: np.ndarray) -> float:
    """Wide-band PESQ of one 16 kHz clip pair (MOS-LQO, about 1.0 ... 4.64)."""
    try:
        return float(pesq_lib.pesq(METRIC_RATE, ref16, deg16, "wb"))
    except pesq_lib.PesqError as e:  # no utterances detected, buffer too short, ...
        raise ClipFailure(f"pesq: {e}") from e


def stoi(ref: np.ndarray, deg: np.ndarray, sample_rate: int) -> float:
    """STOI of one clip pair at its own rate (0 ... 1)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # its "not enough frames" warning becomes the failure below
        value = float(pystoi.stoi(ref, deg, sample_rate, extended=False))
    if value == STOI_FAILED:
        raise ClipFailure("stoi: fewer than 30 non-silent frames in the reference (pystoi returned 1e-5)")
    return value


def visqol_api() -> VisqolApi:
    """A ViSQOL speech-mode scorer with the lattice mapper (needs the `ai-edge-litert` runtime)."""
    api = VisqolApi()
    try:
        api.create(mode="speech", use_lattice_model=True)
    except ImportError as e:
        raise UserError("metric visqol: the ViSQOL lattice runtime is missing; run "
                        "`pip install 'visqol-python[lattice]'`") from e
    return api


def visqol(ref16: np.ndarray, deg16: np.ndarray, api: VisqolApi) -> float:
    """ViSQOL speech-mode MOS-LQO of one 16 kHz clip pair (1 ... 5)."""
    try:
        return float(api.measure_from_arrays(ref16, deg16, METRIC_RATE).moslqo)
    except ValueError as e:  # empty or mismatched signals
        raise ClipFailure(f"visqol: {e}") from e


def voiced_frames(audio16: torch.Tensor, model: str = "full", device: str | torch.device = "cpu") -> torch.Tensor:
    """(frames,) bool, True where one 16 kHz clip (T,) is voiced (module docstring), one frame per 10 ms."""
    audio = audio16.float().reshape(1, -1).to(device)  # (1, T): torchcrepe takes one clip at a time
    _, periodicity = torchcrepe.predict(audio, METRIC_RATE, CREPE_HOP, CREPE_FMIN, CREPE_FMAX, model,
                                        return_periodicity=True, batch_size=512, device=device, pad=True)
    periodicity = torchcrepe.threshold.Silence(SILENCE_DB)(periodicity, audio, METRIC_RATE, CREPE_HOP, pad=True)
    return (periodicity >= VOICED_PERIODICITY).flatten().cpu()


def vuv_f1(ref16: torch.Tensor, deg16: torch.Tensor, model: str = "full",
           device: str | torch.device = "cpu") -> float:
    """F1 of the reconstruction's voiced frames against the reference's (1 = every decision agrees)."""
    truth, pred = voiced_frames(ref16, model, device), voiced_frames(deg16, model, device)
    tp = int((truth & pred).sum())
    wrong = int((truth ^ pred).sum())  # false positives + false negatives
    if tp + wrong == 0:
        raise ClipFailure("vuv_f1: no voiced frame in either clip (F1 undefined)")
    return 2 * tp / (2 * tp + wrong)


def load_utmos(path: str | Path | None, device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The UTMOS22 strong learner from a local TorchScript file: forward((B, T) 16 kHz waves) -> (B,) MOS.

    Such a file is the UTMOS-PyTorch project's scripted strong learner (`utmos_scripted.pt`); fetch it by hand on a
    machine with network access. Nothing is downloaded here (STYLE principle 12)."""
    if path is None:
        raise UserError("metric utmos: no checkpoint given; pass utmos_path=<local TorchScript file of the UTMOS22 "
                        "strong learner, e.g. utmos_scripted.pt> or leave utmos out of `which`")
    if not Path(path).is_file():
        raise UserError(f"metric utmos: checkpoint {path} does not exist; pass the path of a local TorchScript "
                        f"UTMOS file")
    model = torch.jit.load(str(path), map_location=device)
    model.eval()
    return model


def _resample(x: torch.Tensor, sample_rate: int) -> torch.Tensor:
    """(B, 1, T) -> (B, T') float64 at METRIC_RATE."""
    x = x.double().flatten(1)  # (B, T)
    return x if sample_rate == METRIC_RATE else torchaudio.functional.resample(x, sample_rate, METRIC_RATE)


def speech_metrics(ref: torch.Tensor, deg: torch.Tensor, sample_rate: int, which: tuple[str, ...] = DEFAULT_METRICS,
                   crepe_model: str = "full", utmos_path: str | Path | None = None,
                   device: str | torch.device = "cpu") -> dict[str, SpeechScores]:
    """Each metric in `which` on every clip pair of ref and deg ((B, 1, T) in [-1, 1]): {name: SpeechScores}."""
    unknown = [name for name in which if name not in SPEECH_METRICS]
    if unknown:
        raise UserError(f"speech_metrics: unknown metric(s) {unknown}; choose from {list(SPEECH_METRICS)}")
    if crepe_model not in CREPE_MODELS:
        raise UserError(f"speech_metrics: crepe_model {crepe_model!r} is not one of {list(CREPE_MODELS)}")
    if ref.shape != deg.shape or ref.dim() != 3 or ref.shape[1] != 1:
        raise UserError(f"speech_metrics: expected two (B, 1, T) clips of equal shape, got {tuple(ref.shape)} and "
                        f"{tuple(deg.shape)}; mix down to mono and cut both to the same length")
    utmos = load_utmos(utmos_path, device) if "utmos" in which else None  # fail before any slow metric runs
    api = visqol_api() if "visqol" in which else None
    ref_np, deg_np = ref.double().flatten(1).cpu().numpy(), deg.double().flatten(1).cpu().numpy()  # (B, T)
    ref16, deg16 = _resample(ref, sample_rate).cpu(), _resample(deg, sample_rate).cpu()  # (B, T16)
    seconds = ref.shape[-1] / sample_rate

    def score(name: str, i: int) -> float:
        if name == "pesq":
            return pesq_wb(ref16[i].numpy(), deg16[i].numpy())
        if name == "stoi":
            return stoi(ref_np[i], deg_np[i], sample_rate)
        if name == "visqol":
            return visqol(ref16[i].numpy(), deg16[i].numpy(), api)
        if name == "vuv_f1":
            return vuv_f1(ref16[i], deg16[i], crepe_model, device)
        with torch.no_grad():  # utmos
            return float(utmos(deg16[i : i + 1].float().to(device)).flatten()[0])

    results = {}
    for name in which:
        scores = SpeechScores()
        for i in range(ref.shape[0]):
            value, reason = None, None
            if seconds < MIN_SECONDS[name]:
                reason = f"{name}: clip of {seconds:.2f} s is shorter than the {MIN_SECONDS[name]} s it needs"
            elif not (np.isfinite(ref_np[i]).all() and np.isfinite(deg_np[i]).all()):
                reason = f"{name}: clip has non-finite samples"
            else:
                try:
                    value = score(name, i)
                    if not math.isfinite(value):
                        raise ClipFailure(f"{name}: the library returned {value}")
                except ClipFailure as e:
                    value, reason = None, str(e)
            scores.values.append(value)
            if reason is not None:
                scores.failures[i] = reason
        results[name] = scores
    return results
