"""Spoken digits synthesised offline: the audio pipeline's built-in speech data (AUDIO_SPEC.md section 4).

No speech corpus ships in any package and nothing may be downloaded at run time, so speech is made by the
synthesisers espeak-ng (formant) and, where present, flite (diphone/statistical), run as subprocesses:

    espeak-ng -v <accent>+<variant> -s <words/min> -p <pitch 0..99> -g <word gap, 10 ms> -w out.wav "four one"
    flite -voice kal16|awb|rms|slt --setf duration_stretch=<175/words per min> -t "four one" -o out.wav

A voice is (engine, accent, variant): 8 espeak-ng English accents x 18 variants (male m1-m8, female f1-f5,
klatt-synthesiser klatt..klatt5) + 4 flite voices = 148 voices. Speed, pitch and word gap are drawn per
utterance: per digit string, and per take of the ten single digits (one espeak-ng call says all ten, cut
apart at the pauses: `render_words`). Whole voices go to val (the shard writer hashes `Voice.name`, not the
key): the split is speaker-disjoint, as in SC09. flite's pitch is left at each voice's own (its voices have no common scale).

Reproducible: every utterance's settings come from a `random.Random` seeded by a string naming the corpus,
seed, voice and index (not from a shared stream), and both synthesisers are deterministic, so the same
seed gives the same samples whatever the number of `workers` or the order they finish in. The bytes do
depend on the espeak-ng/flite version (Debian 12: espeak-ng 1.51, flite 2.2).
"""

from __future__ import annotations

import functools
import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import soundfile
import torch
import torchaudio.transforms

from data.errors import MediaError, UserError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# `espeak-ng --voices=en`, less the mbrola voices (they need the separate mbrola synthesiser and its databases).
ESPEAK_ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
                  "en-us-nyc")
# `espeak-ng --voices=variant`: the plain male/female/klatt ones (klatt6 renders exactly like klatt; the named
# novelty variants, whisper and croak are left out as hard to understand).
ESPEAK_VARIANTS = tuple(f"m{i}" for i in range(1, 9)) + tuple(f"f{i}" for i in range(1, 6)) + (
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5")
FLITE_VOICES = ("kal16", "awb", "rms", "slt")
ENGINES = ("espeak-ng", "flite")
SPEED = (130, 200)  # words per minute, uniform (espeak-ng default 175); 130 keeps every single digit under 1 s
PITCH = (25, 75)  # espeak-ng base pitch 0..99, uniform (default 50)
WORD_GAP = (4, 16)  # strings: extra pause between words, in espeak-ng's 10 ms units
STRING_SECONDS = (2.0, 4.0)  # a digit string's length after trimming (long enough for STOI/PESQ/ViSQOL)
STRING_DIGITS = (5, 8)  # digits per string drawn from this range, then fewer until the string fits
SILENCE_DB = -40.0  # trimming: 10-ms frames whose RMS is this far below the loudest frame are silence
DIGIT_GAP = 30  # single digits: espeak-ng word gap (10 ms units) between the words of one call, cut apart later
MIN_PAUSE = 0.2  # seconds of silence that separate two words (espeak-ng's stop closures are shorter)
INSTALL_HINT = ("run `apt-get update && apt-get install -y espeak-ng flite` as root (or with sudo), "
                "or `source scripts/env.sh && ensure_speech_tools`")


class Voice(NamedTuple):
    engine: str  # "espeak-ng" | "flite"
    accent: str  # espeak-ng language (en-us), or the flite voice (kal16)
    variant: str  # espeak-ng variant (m3, f2, klatt); "" for flite

    @property
    def name(self) -> str:
        """The speaker's identity: what the train/val split hashes, e.g. "espeak-ng:en-us+m3", "flite:slt"."""
        return f"{self.engine}:{self.accent}+{self.variant}" if self.variant else f"{self.engine}:{self.accent}"

    @property
    def slug(self) -> str:
        """`name` as a shard-key path part (no '.', no ':' or '+')."""
        return "_".join(p for p in self if p)


class Utterance(NamedTuple):
    voice: Voice
    words: tuple[str, ...]  # spoken in this order, e.g. ("four", "one")
    speed: int  # words per minute
    pitch: int  # espeak-ng 0..99 (ignored by flite)
    gap: int  # espeak-ng extra pause between words, 10 ms units (ignored by flite)


def require_tool(engine: str) -> str:
    """Path of the synthesiser's executable, or a UserError naming it and how to install it."""
    path = shutil.which(engine)
    if path is None:
        raise UserError(f"{engine} not found on PATH (it synthesises the spoken-digit data): {INSTALL_HINT}")
    return path


def all_voices(engines: tuple[str, ...] = ENGINES) -> list[Voice]:
    """Every voice of `engines`. espeak-ng is required (UserError without it); flite voices are included only
    when flite is installed, so the corpus (and its source name, which lists the voice count) says which."""
    require_tool("espeak-ng")
    voices = []
    if "espeak-ng" in engines:
        voices += [Voice("espeak-ng", accent, variant) for accent in ESPEAK_ACCENTS for variant in ESPEAK_VARIANTS]
    if "flite" in engines and shutil.which("flite"):
        voices += [Voice("flite", name, "") for name in FLITE_VOICES]
    return voices


def pick_voices(count: int, seed: int, engines: tuple[str, ...] = ENGINES) -> list[Voice]:
    """`count` voices drawn by `seed` (0 = all), in the fixed order of `all_voices`."""
    voices = all_voices(engines)
    if count <= 0 or count >= len(voices):
        return voices
    chosen = set(random.Random(f"voices/{seed}").sample(range(len(voices)), count))
    return [v for i, v in enumerate(voices) if i in chosen]


def synthesise(utt: Utterance, sample_rate: int) -> np.ndarray:
    """One utterance -> float32 mono (T,) at `sample_rate`, untrimmed. Raises MediaError if the engine fails."""
    text = " ".join(utt.words)
    with tempfile.TemporaryDirectory(prefix="speech-") as tmp:
        out = Path(tmp) / "out.wav"
        if utt.voice.engine == "espeak-ng":
            cmd = [require_tool("espeak-ng"), "-v", f"{utt.voice.accent}+{utt.voice.variant}", "-s", str(utt.speed),
                   "-p", str(utt.pitch), "-g", str(utt.gap), "-w", str(out), text]
        else:
            cmd = [require_tool("flite"), "-voice", utt.voice.accent, "--setf",
                   f"duration_stretch={175 / utt.speed:.4f}", "-t", text, "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not out.is_file():
            raise MediaError(f"{utt.voice.engine} failed ({done.returncode}): {done.stderr.strip()[:200]}")
        wav, rate = soundfile.read(out, dtype="float32", always_2d=True)  # (T, C)
    wav = torch.from_numpy(np.ascontiguousarray(wav.mean(axis=1)))
    return (wav if rate == sample_rate else _resampler(rate, sample_rate)(wav)).numpy()


@functools.lru_cache(maxsize=None)
def _resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    """torchaudio's sinc resampler with its kernel built once per rate pair: torchaudio.functional.resample
    rebuilds the kernel on every call, which took longer than running espeak-ng itself."""
    return torchaudio.transforms.Resample(orig, new)


def _loud_frames(wav: np.ndarray, sample_rate: int, db: float) -> tuple[np.ndarray, int]:
    """Indices of the 10-ms frames whose RMS is within `db` of the loudest frame's, and the frame length."""
    frame = max(1, sample_rate // 100)
    frames = len(wav) // frame
    rms = np.sqrt((wav[: frames * frame].astype(np.float64).reshape(frames, frame) ** 2).mean(axis=1))  # (frames,)
    if frames == 0 or rms.max() <= 0:
        raise MediaError("the synthesiser returned silence")
    return np.flatnonzero(rms >= rms.max() * 10 ** (db / 20)), frame


def trim_silence(wav: np.ndarray, sample_rate: int, db: float = SILENCE_DB) -> np.ndarray:
    """`wav` from its first to its last 10-ms frame within `db` of the loudest frame (MediaError if all silent)."""
    loud, frame = _loud_frames(wav, sample_rate, db)
    return wav[loud[0] * frame : (loud[-1] + 1) * frame]


def split_at_pauses(wav: np.ndarray, sample_rate: int, pieces: int, db: float = SILENCE_DB) -> list[np.ndarray] | None:
    """`wav` cut at its `pieces - 1` longest pauses, each piece trimmed as by `trim_silence`; None unless exactly
    that many pauses are at least MIN_PAUSE long (then a word boundary cannot be told from a stop closure)."""
    loud, frame = _loud_frames(wav, sample_rate, db)
    gaps = np.diff(loud)  # frames from one loud frame to the next; 1 inside a sound
    cuts = np.flatnonzero(gaps * frame >= MIN_PAUSE * sample_rate)
    if len(cuts) != pieces - 1:
        return None
    return [wav[run[0] * frame : (run[-1] + 1) * frame] for run in np.split(loud, cuts + 1)]


def fit_centred(wav: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad or crop `wav` to `length` samples, keeping it centred."""
    if len(wav) >= length:
        start = (len(wav) - length) // 2
        return wav[start : start + length]
    left = (length - len(wav)) // 2
    return np.pad(wav, (left, length - len(wav) - left))


def _settings(rng: random.Random) -> dict[str, int]:
    return {"speed": rng.randint(*SPEED), "pitch": rng.randint(*PITCH), "gap": rng.randint(*WORD_GAP)}


def digit_plan(voices: list[Voice], takes: int, seed: int) -> list[tuple[Voice, int, Utterance]]:
    """(voice, take, utterance) for every voice x take: each take says all ten digits, in a random order (a
    list's last word gets the falling intonation: shuffled, that cue is not tied to one digit), at one speed
    and pitch."""
    plan = []
    for voice in voices:
        for take in range(takes):
            rng = random.Random(f"spoken-digits/{seed}/{voice.name}/{take}")
            words = rng.sample(DIGIT_WORDS, len(DIGIT_WORDS))
            plan.append((voice, take, Utterance(voice, tuple(words), **_settings(rng) | {"gap": DIGIT_GAP})))
    return plan


def string_plan(voices: list[Voice], per_voice: int, seed: int) -> list[tuple[Voice, int, Utterance]]:
    """(voice, index, utterance) for `per_voice` random digit strings per voice."""
    plan = []
    for voice in voices:
        for index in range(per_voice):
            rng = random.Random(f"spoken-digit-strings/{seed}/{voice.name}/{index}")
            words = tuple(rng.choice(DIGIT_WORDS) for _ in range(rng.randint(*STRING_DIGITS)))
            plan.append((voice, index, Utterance(voice, words, **_settings(rng))))
    return plan


def render_words(utt: Utterance, sample_rate: int, seconds: float = 1.0) -> dict[str, np.ndarray]:
    """Each word of `utt` trimmed of silence and centred in exactly `seconds` (cropped if longer), by word.
    espeak-ng says the whole list in one call ("three, zero, ...", long word gaps) and the audio is cut at
    its pauses: a call costs ~20 ms of CPU, mostly start-up, so this is ~5x quicker than a call per word.
    When the cut does not give one piece per word (flite's pauses are too short to find), each word is
    said on its own with the same settings."""
    pieces = None
    if utt.voice.engine == "espeak-ng":
        pieces = split_at_pauses(synthesise(utt._replace(words=tuple(w + "," for w in utt.words)), sample_rate),
                                 sample_rate, len(utt.words))
    if pieces is None:
        pieces = [trim_silence(synthesise(utt._replace(words=(w,)), sample_rate), sample_rate) for w in utt.words]
    length = int(round(seconds * sample_rate))
    return {word: fit_centred(piece, length) for word, piece in zip(utt.words, pieces)}


def render_string(utt: Utterance, sample_rate: int) -> tuple[np.ndarray, Utterance]:
    """A digit string trimmed of silence and between STRING_SECONDS long: a string that comes out too long is
    said again without its last digit; one too short is padded with silence, centred. Returns the audio and
    the utterance actually spoken (its words name the sample)."""
    low, high = (int(round(s * sample_rate)) for s in STRING_SECONDS)
    while True:
        wav = trim_silence(synthesise(utt, sample_rate), sample_rate)
        if len(wav) <= high or len(utt.words) == 1:
            return fit_centred(wav, max(low, min(len(wav), high))), utt
        utt = utt._replace(words=utt.words[:-1])


def render_all(render: Callable[[Utterance], object], utterances: list[Utterance], workers: int) -> list[object]:
    """`render` over `utterances` in order, `workers` at a time (threads: each waits on its synthesiser
    subprocess, and torch's resampling releases the GIL). A MediaError is returned in place of its result,
    so one failed utterance becomes one counted skip in the shard writer."""
    def guarded(utt: Utterance) -> object:
        try:
            return render(utt)
        except MediaError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(guarded, utterances))
