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
