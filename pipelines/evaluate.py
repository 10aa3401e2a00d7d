"""Evaluate a tokenizer (reconstruction) and the samples of a prior built on it (generation), offline.

    python -m pipelines.evaluate --data=runs/digits/shards --tokenizer=runs/digits/tokenizer \\
        --samples=runs/digits/samples --out=runs/digits/eval

Reconstruction (val split, every image once): per-image PSNR and SSIM, L1, LPIPS when VGG/LPIPS weight files are
given, codebook utilisation and perplexity, and rFID/KID between the val originals and their reconstructions.
Generation: FID, KID, precision/recall of the samples against the train split, and — for labelled data — how often
the domain classifier recognises the class a sample was generated for.

Every FID names its feature extractor: `fid_digits` (a small classifier trained on the dataset's labelled train
split, trained on first use and cached by dataset hash; its held-out accuracy is recorded) and `fid_inception`
(torch-fidelity's Inception, from `python -m pipelines.weights inception`; skipped with a note when the file is
absent unless --require_inception=true). metrics.json records every setting: extractors and weight hashes, image
counts, the resize protocol, seeds and both checkpoints. Samples made from another dataset are refused.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.shards import MANIFEST, media_loader, read_manifest, sha256_file, write_text_atomic
from pipelines.checkpoint import load_tokenizer
from pipelines.config import parse_config, to_dict
from pipelines.extractors import (ClassifierConfig, classifier_extractor, load_classifier, save_classifier,
                                  train_domain_classifier)
from pipelines.fid import Extractor, FidelityConfig, compute_fidelity, inception_extractor, to_uint8
from pipelines.reconstruct import reconstruction_metrics
from pipelines.weights import DEFAULT_INCEPTION_PATH


@dataclass
class EvaluateConfig:
    data: str = "runs/digits/shards"  # media shards: val = rFID reference, train = gFID reference
    tokenizer: str = ""  # tokenizer checkpoint/run dir for reconstruction metrics; "" = skip them
    samples: str = ""  # output dir of pipelines.sample for generation metrics; "" = skip them
    out: str = "runs/digits/eval"  # metrics.json, recon.png
    extractors: str = "domain,inception"  # feature extractors: domain (classifier), inception
    domain_name: str = "digits"  # tag of the domain extractor's metrics: fid_<domain_name>
    classifier: str = ""  # domain classifier checkpoint; "" = <fidelity.cache_dir>/classifier-<data hash>
    inception_weights: str = DEFAULT_INCEPTION_PATH  # torch-fidelity FID Inception weights file
    require_inception: bool = False  # error (instead of a logged skip) when the Inception weights are missing
    lpips_vgg16_path: str = ""  # torchvision vgg16 weights for recon LPIPS; "" = no LPIPS
    lpips_lin_path: str = ""  # LPIPS v0.1 linear heads for recon LPIPS
    max_reference: int = 0  # train images used as the gFID reference; 0 = all
    inception_limit: int = 0  # at most this many images per side for *_inception (0 = all): ~4 img/s on a CPU
    batch_size: int = 64  # images per tokenizer forward
    device: str = "auto"  # auto | cpu | cuda
    classifier_cfg: ClassifierConfig = field(default_factory=ClassifierConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)


def load_split(data: str, split: str, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 (N, 3, H, W), labels (N,)) of a split, center-cropped: exactly what evaluation compares against."""
    xs, ys, n = [], [], 0
    for batch in media_loader(data, split, 256, train=False):
        xs.append(to_uint8(batch.x))
        ys.append(batch.labels)
        n += len(batch.labels)
        if limit and n >= limit:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:limit], y[:limit]) if limit else (x, y)


def load_samples(samples_dir: str, data_manifest_sha: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The PNGs listed by a sample manifest, refusing samples whose tokens came from another dataset."""
    path = Path(samples_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `python -m pipelines.sample --out={samples_dir}` first")
    manifest = json.loads(path.read_text())
    source = manifest.get("source_manifest_sha256")
    if source != data_manifest_sha:
        raise ValueError(f"{path}: these samples come from a prior trained on data with manifest sha256 {source}, "
                         f"but --data's manifest is {data_manifest_sha}: evaluate against the dataset the prior "
                         f"was trained on")
    images, labels = [], []
    for item in manifest["images"]:
        with Image.open(Path(samples_dir) / item["path"]) as im:
            images.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1))
        labels.append(item.get("label", -1))
    return torch.stack(images), torch.tensor(labels), manifest


def domain_classifier(cfg: EvaluateConfig, data_sha: str) -> Path:
    """The dataset's classifier checkpoint, trained on its labelled train split on first use."""
    path = Path(cfg.classifier or Path(cfg.fidelity.cache_dir) / f"classifier-{data_sha[:16]}")
    if (path / "config.json").is_file():
        return path
    images, labels = load_split(cfg.data, "train")
    if (labels < 0).any():
        raise ValueError(f"{cfg.data} is unlabelled: a domain classifier needs labels; use --extractors=inception")
    ccfg = dataclasses.replace(cfg.classifier_cfg, num_classes=int(labels.max()) + 1, image_size=images.shape[-1])
    trained = train_domain_classifier(images, labels, ccfg)
    save_classifier(path, trained)
    print(f"[evaluate] trained the {cfg.domain_name} classifier: held-out accuracy {trained.heldout_accuracy:.3f} "
          f"-> {path}")
    return path


def extractors(cfg: EvaluateConfig, data_sha: str, labelled: bool, notes: list[str]) -> list[Extractor]:
    out = []
    for name in [e.strip() for e in cfg.extractors.split(",") if e.strip()]:
        if name == "domain":
            if not labelled:
                notes.append("domain extractor skipped: the dataset is unlabelled")
                continue
            out.append(classifier_extractor(domain_classifier(cfg, data_sha), name=f"{cfg.domain_name}-classifier"))
        elif name == "inception":
            if not Path(cfg.inception_weights).is_file() and not cfg.require_inception:
                notes.append(f"fid_inception skipped: {cfg.inception_weights} not found "
                             f"(make it with `python -m pipelines.weights inception`)")
                continue
            out.append(inception_extractor(cfg.inception_weights))
        else:
            raise ValueError(f"unknown extractor {name!r} in --extractors; choose from domain, inception")
    return out


def limit(cfg: EvaluateConfig, e: Extractor) -> int | None:
    """How many images per side an extractor sees (None = all)."""
    return cfg.inception_limit or None if e.tag == "inception" else None


def main(argv: list[str] | None = None, base: dict | None = None) -> dict[str, float]:
    cfg = parse_config(EvaluateConfig, argv, base)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    cfg.fidelity.cuda = device == "cuda"
    data_manifest = read_manifest(cfg.data)
    data_sha = sha256_file(Path(cfg.data) / MANIFEST)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    exts = extractors(cfg, data_sha, bool(data_manifest.class_names), notes)
    metrics: dict[str, float] = {}
    record: dict = {"settings": to_dict(cfg), "data_manifest_sha256": data_sha, "notes": notes,
                    "extractors": [{"name": e.name, "tag": e.tag, "weights": e.weights_path,
                                    "weights_sha256": e.weights_hash, "protocol": e.protocol} for e in exts]}
    if cfg.classifier or any(e.tag == cfg.domain_name for e in exts):
        clf_path = domain_classifier(cfg, data_sha)
        record["classifier"] = {"path": str(clf_path), **{k: v for k, v in load_classifier(clf_path)[1].items()
                                                          if k in ("heldout_accuracy", "num_train")}}

    if cfg.tokenizer:
        model, ckpt = load_tokenizer(cfg.tokenizer, device)
        originals, recons = [], []
        loader = media_loader(cfg.data, "val", cfg.batch_size, train=False)
        rec = reconstruction_metrics(model, loader, device, grid_path=out / "recon.png",
                                     on_batch=lambda x, x_hat: (originals.append(to_uint8(x).cpu()),
                                                                recons.append(to_uint8(x_hat).cpu())))
        metrics.update({k.replace("val/", "recon/"): v for k, v in rec.items()})
        originals, recons = torch.cat(originals), torch.cat(recons)
        if cfg.lpips_vgg16_path:
            from tokenizer.losses import build_lpips
            lp = build_lpips(cfg.lpips_vgg16_path, cfg.lpips_lin_path).to(device)
            with torch.no_grad():
                vals = [lp(a.to(device).float() / 127.5 - 1, b.to(device).float() / 127.5 - 1).flatten()
                        for a, b in zip(originals.split(64), recons.split(64))]
            metrics["recon/lpips"] = float(torch.cat(vals).mean())
        for e in exts:
            n = limit(cfg, e)
            res = compute_fidelity(recons[:n], originals[:n], e, cfg.fidelity,
                                   reference_id=f"{data_sha}:val:{n or 'all'}")
            metrics.update({f"recon/{k}": v for k, v in res.metrics.items()})
        record["tokenizer"] = str(ckpt)

    if cfg.samples:
        images, labels, manifest = load_samples(cfg.samples, data_sha)
        reference, _ = load_split(cfg.data, "train", cfg.max_reference)
        for e in exts:
            n = limit(cfg, e)
            res = compute_fidelity(images[:n], reference[:n], e, cfg.fidelity,
                                   reference_id=f"{data_sha}:train:{n or cfg.max_reference or 'all'}")
            metrics[f"gen/n_{e.tag}"] = float(res.n_generated)
            metrics.update({f"gen/{k}": v for k, v in res.metrics.items()})
        if "classifier" in record and (labels >= 0).all():
            clf, _ = load_classifier(record["classifier"]["path"])
            with torch.no_grad():
                pred = torch.cat([clf(clf.prepare(b)).argmax(1) for b in images.split(256)])
            metrics[f"gen/class_accuracy_{cfg.domain_name}"] = float((pred == labels).float().mean())
        metrics["gen/samples"] = float(len(images))
        metrics["gen/reference"] = float(len(reference))
        record["samples"] = {"dir": cfg.samples, "prior": manifest.get("prior"), "seed": manifest.get("seed"),
                             "settings": manifest.get("settings")}

    record["metrics"] = metrics
    write_text_atomic(out / "metrics.json", json.dumps(record, indent=2, default=str))
    for n in notes:
        print(f"[evaluate] {n}")
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
