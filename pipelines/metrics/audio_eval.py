"""Audio evaluation: a tokenizer's reconstructions of whole utterances, and generated clips judged by a classifier.

    clips = full_clips("runs/sd/strings", "val")                 # every val clip at its full length, float (1, T)
    metrics, recons = reconstruct_and_score(model, clips, rate, AudioEvalConfig(crepe_model="tiny"), device)
    gen = generated_audio_metrics(gen_feats, gen_logits, labels, ref_feats, tag, fidelity_cfg)  # classifier outputs

Reconstruction runs on whole utterances, not the 1-s training crops, as the paper's test set does (`evaluation_speech`
uses full LibriTTS utterances): each clip is zero-padded at the end to a multiple of the hop, encoded and decoded
alone, and cut back. Per clip: L1, SNR, SI-SDR, DAC's multi-scale mel distance, multi-resolution STFT distance
(pipelines/metrics/audio.py), and the speech metrics PESQ-wb, STOI, ViSQOL (speech mode), V/UV F1 (CREPE) and, given a
local checkpoint, UTMOS (pipelines/metrics/speech.py). A speech metric that cannot score a clip (too short: PESQ,
STOI and ViSQOL need >= 2 s; a library refusal) is counted in `<name>_failures` and left out of the mean, never
averaged in as the official script's -1. Each per-clip metric gets a 95% bootstrap interval of its mean over the
clips it scored, `<name>/ci95_lo` / `<name>/ci95_hi` (`bootstrap` resamples; pipelines/metrics/intervals.py).
The code rate: `tokens_per_second` = rate / hop, `bitrate_kbps` = tokens/s x log2 K / 1000, and utilisation over
the val tokens.

Generated clips (no Inception for audio): a log-mel classifier trained on the real train split
(pipelines/metrics/extractors.py, modality "audio") gives the class accuracy (how often the class a clip was generated
for is heard), an Inception-style score of its logits (`is_<tag>`) and a Fréchet distance on its features
(`fd_<tag>`, named so, never "FID"), with KID and precision/recall on the same features.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from data.audio import read_audio
from data.errors import UserError
from data.shards import damaged, iter_shard_samples, read_manifest, shard_urls
from pipelines.metrics.audio import mel_distance, si_sdr, snr, stft_distance
from pipelines.metrics.fid import FidelityConfig, metrics_from_features
from pipelines.metrics.grids import recon_grid, write_png
from pipelines.metrics.inputs import shard_batches
from pipelines.metrics.intervals import interval_metrics, mean_interval
from pipelines.metrics.reconstruction import codebook_usage, usage_metrics, usage_note
from pipelines.metrics.shares import gather_objects, my_shards, process, reduce_sum
from pipelines.metrics.speech import DEFAULT_METRICS, SpeechScores, speech_metrics
from tokenizer.quantizers import CodebookUsage


@dataclass
class AudioEvalConfig:
    speech_metrics: tuple[str, ...] = DEFAULT_METRICS  # pesq, stoi, visqol, vuv_f1 (+ utmos with utmos_path)
    crepe_model: str = "full"  # V/UV F1's pitch tracker: full (reports, ~10 s a clip on CPU) | tiny (quick runs)
    utmos_path: str = ""  # local UTMOS TorchScript file; "" = no UTMOS (nothing is downloaded)
    max_clips: int = 0  # val clips reconstructed (a seeded random subset); 0 = all
    seed: int = 0  # the subset's seed
    bootstrap: int = 200  # resamples of the clips for each per-clip metric's 95% interval of the mean; 0 = none
    bootstrap_seed: int = 0  # seed of those resamples


class Clip(NamedTuple):
    key: str
    x: torch.Tensor  # (1, T) float32 in [-1, 1], the whole file
    label: int


def full_clips(data: str | Path, split: str, limit: int = 0, seed: int = 0) -> list[Clip]:
    """Every clip of a split at its full length (the shards store whole files; training crops happen at read time),
    or a seeded random subset of `limit` of them, in shard order."""
    manifest = read_manifest(data)
    if manifest.spec.modality != "audio":
        raise UserError(f"{data} holds {manifest.spec.modality}, not audio")
    clips = []
    for path in shard_urls(data, manifest.shard_names.get(split, [])):
        for key, fields in iter_shard_samples(path):
            try:
                (wav, rate), label = read_audio(fields[manifest.field_name]), int(fields["cls"])
            except (KeyError, ValueError) as exc:  # a member missing, undecodable bytes (MediaError), a bad .cls
                raise damaged(path, key, exc) from None
            if rate != manifest.spec.sample_rate:
                raise UserError(f"{path}: sample {key!r} is {rate} Hz but the manifest says "
                                f"{manifest.spec.sample_rate} Hz; re-shard with `python -m pipelines.make_shards`")
            clips.append(Clip(key, torch.from_numpy(wav).unsqueeze(0), label))
    if limit and limit < len(clips):
        keep = sorted(random.Random(seed).sample(range(len(clips)), limit))
        clips = [clips[i] for i in keep]
    return clips


@torch.no_grad()
def reconstruct_clip(model, x: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat (1, T), codes) of one whole clip: zero-padded at the end to a multiple of the hop, cut back after."""
    hop, length = model.downsample_factor, x.shape[-1]
    padded = torch.nn.functional.pad(x, (0, -length % hop))[None].to(device)  # (1, 1, T')
    out = model(padded)
    return out.x_hat[0, :, :length].float().clamp(-1, 1).cpu(), out.codes.cpu()


PER_CLIP = {"snr": lambda x, y, rate: snr(x, y), "si_sdr": lambda x, y, rate: si_sdr(x, y),
            "mel_distance": mel_distance, "stft_distance": lambda x, y, rate: stft_distance(x, y)}


def score_clip(x: torch.Tensor, y: torch.Tensor, rate: int, cfg: AudioEvalConfig, device="cpu") -> dict:
    """One clip pair (1, T): {"values": L1 and PER_CLIP, "speech": {metric: SpeechScores}, "frames": T}."""
    a, b = x[None].float(), y[None].float()  # (1, 1, T)
    values = {"recon_l1": float((a - b).abs().mean()), **{name: float(fn(a, b, rate)[0])
                                                          for name, fn in PER_CLIP.items()}}
    speech = speech_metrics(a, b, rate, tuple(cfg.speech_metrics), cfg.crepe_model, cfg.utmos_path or None,
                            device) if cfg.speech_metrics else {}
    return {"values": values, "speech": speech, "frames": x.shape[-1]}


def summarise_clips(scored: list[dict], rate: int, cfg: AudioEvalConfig) -> dict[str, float]:
    """Means over clips (`score_clip` results, in clip order) of L1 and PER_CLIP, and the speech metrics with their
    counts and failures."""
    sums = {"recon_l1": 0.0, **{name: 0.0 for name in PER_CLIP}}
    speech = {name: SpeechScores() for name in cfg.speech_metrics}
    for one in scored:
        for name in sums:
            sums[name] += one["values"][name]
        for name, scores in one["speech"].items():
            speech[name].extend(scores)
    n = max(1, len(scored))
    metrics = {name: total / n for name, total in sums.items()}
    for name in sums:
        metrics.update(interval_metrics(name, mean_interval([one["values"][name] for one in scored], cfg.bootstrap,
                                                            cfg.bootstrap_seed)))
    for name, scores in speech.items():
        summary = scores.summary(name)
        if not scores.count:  # no clip could be scored: counts only, never a NaN mean in metrics.json
            del summary[name]
        metrics.update(summary)
        metrics.update(interval_metrics(name, mean_interval(scores.values, cfg.bootstrap, cfg.bootstrap_seed)))
    metrics["samples"] = float(len(scored))
    metrics["seconds"] = float(sum(one["frames"] for one in scored) / rate)
    return metrics


def score_clips(refs: list[torch.Tensor], recons: list[torch.Tensor], rate: int, cfg: AudioEvalConfig,
                device="cpu") -> dict[str, float]:
    """Means over clips of L1 and PER_CLIP, and the speech metrics with their counts and failures."""
    return summarise_clips([score_clip(x, y, rate, cfg, device) for x, y in zip(refs, recons)], rate, cfg)


def failure_notes(prefix: str, metrics: dict[str, float]) -> list[str]:
    return [f"{prefix}{k[:-len('_failures')]}: {v:.0f} of {metrics[prefix + 'samples']:.0f} clips could not be scored "
            f"(too short or refused by the library; left out of the mean)"
            for k, v in metrics.items() if k.endswith("_failures") and v and k.startswith(prefix)]


def reconstruct_and_score(model, clips: list[Clip], rate: int, cfg: AudioEvalConfig, device, accelerator=None,
                          keep: int = 8) -> tuple[dict[str, float], list[torch.Tensor]]:
    """recon/* over whole clips: the per-clip and speech metrics, utilisation on these tokens, the code rate; and the
    reconstructions of the first `keep` clips. Under several processes each reconstructs and scores clips r, r + P,
    ... (pipelines/metrics/shares.py) and every process gets the scores of all, in clip order."""
    model.eval()
    usage = CodebookUsage(model.quantizer.num_codes, device="cpu")
    rank, count = process(accelerator)
    scored = []  # (clip index, score_clip result, its reconstruction when among the first `keep`)
    for i in range(rank, len(clips), count):
        x_hat, codes = reconstruct_clip(model, clips[i].x, device)
        usage.update(codes)
        scored.append((i, score_clip(clips[i].x, x_hat, rate, cfg, device), x_hat if i < keep else None))
    usage.counts = reduce_sum(usage.counts, accelerator)
    scored = sorted(gather_objects(scored, accelerator), key=lambda one: one[0])
    metrics = {**summarise_clips([one for _, one, _ in scored], rate, cfg), **usage_metrics(usage, ""),
               "tokens_per_second": rate / model.downsample_factor,
               "bitrate_kbps": rate / model.downsample_factor * math.log2(usage.num_codes) / 1000}
    return {f"recon/{name}": v for name, v in metrics.items()}, [x_hat for _, _, x_hat in scored[:keep]]


def audio_reconstruction(model, data: str | Path, out: Path, cfg: AudioEvalConfig, usage_split: str, batch_size: int,
                         device, split: str = "val", accelerator=None) -> tuple[dict[str, float], list[str]]:
    """What `evaluate` and `reconstruct` report for an audio tokenizer: recon/* over the whole clips of `split`,
    usage/* over `usage_split` (the read crops, encoder only), notes, and `out`/recon.png (by the main process).
    Under several processes (`accelerator`) each takes its share of the clips and of the usage split's shards."""
    clips = full_clips(data, split, cfg.max_clips, cfg.seed)
    metrics, recons = reconstruct_and_score(model, clips, read_manifest(data).spec.sample_rate, cfg, device,
                                            accelerator)
    if usage_split:
        batches = (b for _, b in shard_batches(data, usage_split, batch_size, my_shards(data, usage_split,
                                                                                      accelerator)))
        metrics.update(codebook_usage(model, batches, device, accelerator=accelerator))
    notes = failure_notes("recon/", metrics)
    notes += [n for n in (usage_note(metrics, "recon/"), usage_note(metrics, "usage/")) if n]
    shown = clips[:8]
    if shown and (accelerator is None or accelerator.is_main_process):  # originals above their reconstructions,
        n = min(c.x.shape[-1] for c in shown)                           # cut to the shortest shown clip
        write_png(recon_grid(torch.stack([c.x[..., :n] for c in shown]), torch.stack([r[..., :n] for r in recons[:8]]),
                             "audio"), Path(out) / "recon.png")
    return metrics, notes


def generated_audio_metrics(gen_feats: torch.Tensor, gen_logits: torch.Tensor, labels: torch.Tensor,
                            ref_feats: torch.Tensor, tag: str, fidelity: FidelityConfig
                            ) -> tuple[dict[str, float], list[str]]:
    """gen/*: class accuracy, Inception-style score, and Fréchet distance / KID / precision-recall on the log-mel
    classifier's features (`extractors.classifier_outputs`) of generated clips against real clips of the train split:
    generated features (N, D) and logits (N, classes) with the labels they were generated for, reference features."""
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    result = metrics_from_features(gen_feats.double().numpy(), ref_feats.double().numpy(), tag, fidelity)
    metrics = {f"gen/{k.replace('fid_', 'fd_')}": v for k, v in result.metrics.items()}
    for k, interval in result.intervals.items():
        metrics.update(interval_metrics(f"gen/{k.replace('fid_', 'fd_')}", interval))
    splits = max(1, min(10, len(gen_feats) // 10))  # at least 10 clips a split
    isc = isc_features_to_metric(gen_logits.double(), splits=splits, rng_seed=fidelity.seed)
    metrics[f"gen/is_{tag}"], metrics[f"gen/is_std_{tag}"] = isc[KEY_METRIC_ISC_MEAN], isc[KEY_METRIC_ISC_STD]
    if (labels >= 0).all():
        correct = gen_logits.argmax(1) == labels
        metrics[f"gen/class_accuracy_{tag}"] = float(correct.float().mean())
        metrics.update(interval_metrics(f"gen/class_accuracy_{tag}", mean_interval(
            correct.double().numpy(), fidelity.bootstrap, fidelity.bootstrap_seed)))
    metrics[f"gen/n_{tag}"], metrics[f"gen/n_reference_{tag}"] = float(len(gen_feats)), float(len(ref_feats))
    notes = [f"gen/{n}" for n in result.notes]
    return metrics, notes
