"""A classical speech codec measured like a tokenizer: the same whole val clips, the same metrics.

    python -m pipelines.codec_baseline --data=runs/sd/strings --codec=opus --bitrate=6 --out=runs/sd/opus-6

Opus (`opusenc --speech`, kbit/s) and Codec2 (`c2enc`, bit/s at 8 kHz, its delay removed) through their command-line
tools (pipelines/metrics/codecs.py; `apt-get install -y opus-tools codec2`); every clip of the split at its full
length goes through the codec and is scored by pipelines/metrics/audio_eval.py exactly as `evaluate` scores a
tokenizer's reconstruction, so `compare --codecs` can put the codec beside the tokenizers. Writes metrics.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.errors import UserError
from data.files import write_text_atomic
from data.shards import read_manifest
from pipelines.cli import run
from pipelines.config import required, to_dict
from pipelines.metrics.audio_eval import AudioEvalConfig, failure_notes, full_clips, score_clips
from pipelines.metrics.codecs import codec2_round_trip, opus_round_trip

CODECS = {"opus": ("kbit/s", lambda x, rate, b: opus_round_trip(x, rate, b), 1.0),
          "codec2": ("bit/s", lambda x, rate, b: codec2_round_trip(x, rate, int(b)), 1e-3)}


@dataclass
class CodecBaselineConfig:
    data: str = required()  # audio media shards; the whole clips of `split` are coded
    out: str = required()  # metrics.json
    codec: str = "opus"  # opus | codec2
    bitrate: float = 6.0  # opus: kbit/s (6-256); codec2: bit/s (700C, 1200, 1300, 1400, 1600, 2400, 3200)
    split: str = "val"
    audio: AudioEvalConfig = field(default_factory=AudioEvalConfig)  # the metrics, as evaluate's


def parse_codec(name: str) -> tuple[str, float]:
    """`opus-6` / `codec2-1200` (compare's --codecs entries) -> (codec, bitrate in its unit)."""
    codec, _, rate = name.rpartition("-")
    try:
        value = float(rate)
    except ValueError:
        value = -1.0
    if codec not in CODECS or value <= 0:
        raise UserError(f"--codecs: {name!r} is not <codec>-<bitrate> with a codec in {sorted(CODECS)} "
                        f"(e.g. opus-6 for 6 kbit/s, codec2-1200 for 1,200 bit/s)")
    return codec, value


def main(cfg: CodecBaselineConfig) -> dict[str, float]:
    if cfg.codec not in CODECS:
        raise UserError(f"--codec={cfg.codec!r}: choose one of {sorted(CODECS)}")
    unit, round_trip, to_kbps = CODECS[cfg.codec]
    rate = read_manifest(cfg.data).spec.sample_rate
    clips = full_clips(cfg.data, cfg.split, cfg.audio.max_clips, cfg.audio.seed)
    if not clips:
        raise UserError(f"--data={cfg.data} has no {cfg.split} clips")
    decoded = [round_trip(c.x[None], rate, cfg.bitrate)[0] for c in clips]
    metrics = {f"recon/{k}": v for k, v in score_clips([c.x for c in clips], decoded, rate, cfg.audio).items()}
    metrics["recon/bitrate_kbps"] = cfg.bitrate * to_kbps
    notes = failure_notes("recon/", metrics)
    record = {"metrics": metrics, "notes": notes, "codec": cfg.codec, "bitrate": f"{cfg.bitrate:g} {unit}",
              "settings": to_dict(cfg)}
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(cfg.out) / "metrics.json", json.dumps(record, indent=2))
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main, CodecBaselineConfig)
