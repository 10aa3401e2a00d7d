"""Data the tests make for themselves (imported by test modules: pytest puts tests/ on sys.path)."""


def write_tones(folder, per_class: int, rate: int, seconds: float = 0.6) -> None:
    """A wav folder of two classes, `low` (220 Hz) and `high` (880 Hz), `per_class` slightly detuned noisy tones
    each: the audio tests' data."""
    import numpy as np
    import soundfile

    rng = np.random.default_rng(0)
    t = np.arange(int(rate * seconds)) / rate
    for label, base in (("low", 220.0), ("high", 880.0)):
        (folder / label).mkdir(parents=True)
        for i in range(per_class):
            tone = 0.5 * np.sin(2 * np.pi * base * (1 + 0.05 * i) * t) + 0.01 * rng.standard_normal(len(t))
            soundfile.write(folder / label / f"{i}.wav", tone, rate)


def tone_shards(root, per_class: int, rate: int, clip_seconds: float, val_fraction: float = 0.25):
    """Audio media shards (`root`/shards) of `write_tones`' two classes, read in `clip_seconds` crops."""
    from data.builtin import open_source
    from data.media import MediaSpec
    from data.shards import write_media_shards

    write_tones(root / "wavs", per_class=per_class, rate=rate)
    shards = root / "shards"
    write_media_shards(open_source(str(root / "wavs"), "audio", 0, 0, 0, "auto"), shards,
                       MediaSpec(modality="audio", sample_rate=rate, clip_seconds=clip_seconds),
                       val_fraction=val_fraction, log=lambda *a: None)
    return shards


# Three short digit strings in three espeak-ng voices: 2-3 s each, long enough for PESQ, STOI and ViSQOL.
SPEECH_TEXTS = (("en", "three seven one nine four"), ("en-us+f3", "eight two five six zero"),
                ("en+m3", "four four one seven two"))


def speech_clips(rate: int, count: int = 2, use_espeak: bool = True):
    """(count, T) float32 speech-like clips at `rate`, cut to a common length, peak 0.5, and the source's name.

    Spoken digit strings from espeak-ng when it is installed (`apt-get install -y espeak-ng`), else
    `synthetic_vowels`: the audio metric tests need voiced and unvoiced stretches, formants and pauses."""
    import shutil
    import subprocess
    import tempfile
    from math import gcd

    import numpy as np
    import scipy.signal
    import soundfile

    if not (use_espeak and shutil.which("espeak-ng")):
        return synthetic_vowels(rate, count), "synthetic"
    clips = []
    with tempfile.TemporaryDirectory() as tmp:
        for voice, text in SPEECH_TEXTS[:count]:
            path = f"{tmp}/{len(clips)}.wav"
            subprocess.run(["espeak-ng", "-v", voice, "-s", "140", "-w", path, text], check=True, capture_output=True)
            x, source_rate = soundfile.read(path, dtype="float64")
            g = gcd(rate, source_rate)
            clips.append(scipy.signal.resample_poly(x, rate // g, source_rate // g))
    length = min(len(c) for c in clips)
    out = np.stack([c[:length] / np.abs(c[:length]).max() * 0.5 for c in clips]).astype(np.float32)
    return out, "espeak-ng"


def synthetic_vowels(rate: int, count: int = 2, seconds: float = 2.5):
    """(count, T) float32 'vowel' clips: a glottal-like harmonic series (f0 ~110-220 Hz with vibrato and a slow
    glide) shaped by three formants, in syllables of ~0.25 s separated by pauses, plus short noise 'fricatives'."""
    import numpy as np

    rng = np.random.default_rng(0)
    t = np.arange(int(rate * seconds)) / rate
    clips = []
    for k in range(count):
        f0 = (110 + 50 * k) * (1 + 0.1 * np.sin(2 * np.pi * 0.7 * t)) * (1 + 0.02 * np.sin(2 * np.pi * 5.5 * t))
        phase = 2 * np.pi * np.cumsum(f0) / rate
        formants = (700 + 100 * k, 1200 + 150 * k, 2600)
        voice = np.zeros_like(t)
        for h in range(1, 40):
            freq = h * f0
            gain = sum(np.exp(-((freq - f) / 120.0) ** 2) for f in formants) + 0.05 / h
            voice += np.where(freq < rate / 2, gain, 0.0) * np.sin(h * phase)
        syllables = np.clip(np.sin(2 * np.pi * 2.0 * t + k), 0, None) ** 0.5  # voiced stretches and pauses
        fricative = (np.sin(2 * np.pi * 2.0 * t + k) < -0.9) * rng.standard_normal(len(t)) * 0.1
        x = voice * syllables + fricative
        clips.append(0.5 * x / np.abs(x).max())
    return np.stack(clips).astype(np.float32)


OFFICIAL_FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures" / "official_simvq"


def official_fixture(kind: str):
    """(state dict, reference outputs) of the official `kind` ("image" | "audio") model in tests/fixtures."""
    from safetensors.torch import load_file

    return tuple(load_file(str(OFFICIAL_FIXTURES / f"{kind}_small_{part}.safetensors")) for part in ("state", "io"))


def convert_official(kind: str, state, ema: bool = True, net: dict | None = None, edit=None):
    """(project model in eval mode, its TokenizerConfig) converted from an official state dict: `net` fields replaced
    after inference, `edit(project_state)` applied before loading (a negative control's tampering)."""
    import dataclasses

    from tokenizer import build_tokenizer
    from tokenizer.official import FORMATS, check_against, generator_weights

    fmt = FORMATS[kind]
    weights = generator_weights(state, fmt.prefixes, ema=ema, frozen=fmt.frozen)
    cfg = fmt.infer_config(weights)
    cfg = dataclasses.replace(cfg, net={**cfg.net, **(net or {})})
    sd = fmt.convert(weights, cfg)
    if edit is not None:
        edit(sd)
    model = build_tokenizer(cfg).eval()
    check_against(sd, model.state_dict(), f"the {kind} fixture")
    model.load_state_dict(sd)
    return model, cfg


def python_m(module: str, *argv: str, processes: int = 1, timeout: int = 600) -> str:
    """`python -m <module> argv` in a fresh process from the repository root (as a user runs it: a pytest worker that
    has run other tests can hold process-wide state that moves a float's last bit), or in `processes` CPU processes
    through torch.distributed.run (what `accelerate launch --multi_gpu` runs); one thread each. Returns stdout."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    launcher = ("torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "-m") if processes > 1 else ()
    proc = subprocess.run([sys.executable, "-m", *launcher, module, *argv], cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout
