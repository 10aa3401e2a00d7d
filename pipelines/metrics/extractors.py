"""Domain feature extractors for FID on data that Inception was never meant to see (16x16 digits, ...).

Inception features of 16x16 digits blown up to 299x299 measure little. Instead a small CNN classifier is trained
on the labelled domain data; its penultimate layer (global average pool of the last conv stage, `feature_dim`
wide, the role pool3 plays in Inception) gives the features for fid_<tag>/kid_<tag>/precision_<tag>.

    trained = train_domain_classifier(images, labels, ClassifierConfig())     # images uint8 or [-1, 1] float
    save_classifier("weights/digits-classifier", trained)                     # model.safetensors + config.json
    ext = classifier_extractor("weights/digits-classifier")                   # registers "digits-classifier"
    compute_fidelity(generated, reference, ext).metrics["fid_digits"]

Audio (spoken digits) has no Inception: the same classifier runs on a log-mel spectrogram (`modality="audio"`), the
SC09 practice of WaveGAN/DiffWave; its logits give an Inception-style score and its features a Fréchet distance
(reported as `fd_<tag>`, never "FID"). Audio goes through `classifier_outputs` directly (torch-fidelity takes
images; pipelines/metrics/audio_eval.py).

The checkpoint records the held-out accuracy: an extractor that cannot tell the classes apart gives meaningless
distances, so look at it before trusting a number. The torch-fidelity class loads the checkpoint directory given as
`feature_extractor_weights_path`, so one registered name serves any checkpoint; the checkpoint's sha256 goes into
the reference-feature cache key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch_fidelity import FeatureExtractorBase, register_feature_extractor

from pipelines.checkpoint import checkpoint_hash, load_checkpoint, save_checkpoint
from pipelines.config import from_dict, to_dict
from pipelines.metrics.audio import fit_length
from pipelines.metrics.fid import Extractor, registered_extractor
from pipelines.metrics.inputs import from_integers

CHECKPOINT_KIND = "domain-classifier"


@dataclass
class ClassifierConfig:
    modality: str = "image"       # image: (B, 3, H, W) pictures; audio: (B, 1, T) clips, seen as log-mel spectrograms
    image_size: int = 16          # side of the square input; other sizes are resized (bilinear, antialiased)
    sample_rate: int = 16_000     # audio: the clips' rate
    clip_samples: int = 16_000    # audio: clips are centre-cropped or zero-padded to this length
    n_mels: int = 40              # audio: mel bands (n_fft 1024 at 16 kHz scaled with the rate, hop 20 ms)
    num_classes: int = 10
    width: int = 16               # channels of the first conv stage
    feature_dim: int = 64         # channels of the second stage = FID feature dimension
    epochs: int = 8               # full passes over the training split (digits: ~99% held-out accuracy)
    min_steps: int = 0            # at least this many optimiser steps (more epochs on a small split); 0 = epochs only
    batch_size: int = 128
    lr: float = 2e-3              # Adam
    weight_decay: float = 1e-4
    holdout_fraction: float = 0.2  # share of the labelled images kept out of training to measure accuracy
    seed: int = 0                 # split, init and batch order


def as_float(x: torch.Tensor, integers: torch.dtype, what: str) -> torch.Tensor:
    """The integers a file stores (uint8 pixels 0..255 | int16 samples) or floats -> float in [-1, 1]."""
    if x.dtype == integers:
        return from_integers(x)
    if x.is_floating_point():
        return x.float()
    raise ValueError(f"extractors: expected {integers} or float [-1, 1] {what}, got {x.dtype}")


class DomainClassifier(nn.Module):
    """Two conv stages (conv-BN-ReLU x2, max-pool), global average pool -> features, linear -> logits. Images enter as
    they are (3 channels); audio as a 1-channel log-mel picture."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                nn.MaxPool2d(2))

        if cfg.modality not in ("image", "audio"):
            raise ValueError(f"classifier modality {cfg.modality!r}: choose image or audio")
        self.cfg = cfg
        self.body = nn.Sequential(stage(3 if cfg.modality == "image" else 1, cfg.width),
                                  stage(cfg.width, cfg.feature_dim))
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)
        if cfg.modality == "audio":
            import torchaudio
            n_fft = 1 << round(math.log2(1024 * cfg.sample_rate / 16_000))
            self.mel = torchaudio.transforms.MelSpectrogram(cfg.sample_rate, n_fft=n_fft,
                                                            hop_length=cfg.sample_rate // 50, n_mels=cfg.n_mels)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [-1, 1] (B, 3, H, W) -> float [-1, 1] at image_size; audio: int16 or float [-1, 1]
        (B, 1, T) -> (B, 1, n_mels, frames) log-mel of the centre `clip_samples`."""
        if self.cfg.modality == "audio":
            return self.prepare_audio(images)
        x = as_float(images, torch.uint8, "images")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"extractors: expected (B, 3, H, W) images, got {tuple(x.shape)}")
        s = self.cfg.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return x

    def prepare_audio(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.dim() == 4:  # already a log-mel picture (prepared once before training)
            return clips
        x = as_float(clips, torch.int16, "clips")
        if x.dim() != 3 or x.shape[1] != 1:
            raise ValueError(f"extractors: expected (B, 1, T) clips, got {tuple(x.shape)}")
        x = fit_length(x, self.cfg.clip_samples)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return torch.log(self.mel(x) + 1e-5)  # (B, 1, n_mels, frames)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.prepare(images)).mean(dim=(2, 3))  # (B, feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))  # (B, num_classes)


@dataclass
class TrainedClassifier:
    model: DomainClassifier
    config: ClassifierConfig
    heldout_accuracy: float
    num_train: int
    num_heldout: int
    history: list[float] = field(default_factory=list)  # mean training loss per epoch


def accuracy(model: DomainClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
    return float((preds == labels).float().mean())


def train_domain_classifier(images: torch.Tensor, labels: torch.Tensor,
                            cfg: ClassifierConfig | None = None) -> TrainedClassifier:
    """Train on a random (1 - holdout_fraction) split; report accuracy on the rest. Deterministic for a seed."""
    cfg = cfg or ClassifierConfig()
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(images) != len(labels) or len(images) < 2:
        raise ValueError(f"extractors: need matching images and labels, got {len(images)} and {len(labels)}")
    if labels.min() < 0 or labels.max() >= cfg.num_classes:
        raise ValueError(f"extractors: labels must lie in [0, {cfg.num_classes}); unlabelled (-1) images cannot "
                         f"train a classifier")
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(images), generator=g)
    n_hold = max(1, int(round(cfg.holdout_fraction * len(images))))
    hold, train = order[:n_hold], order[n_hold:]
    # The model's own RNG use (init) is seeded without touching the caller's global generator.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = DomainClassifier(cfg)
    x_all = model.prepare(images)  # resize once, not every epoch
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = []
    epochs = max(cfg.epochs, -(-cfg.min_steps // max(1, -(-len(train) // cfg.batch_size))))
    for _ in range(epochs):
        model.train()
        perm = train[torch.randperm(len(train), generator=g)]
        total = 0.0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(model(x_all[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        history.append(total / len(perm))
    acc = accuracy(model, x_all[hold], labels[hold])
    model.eval()
    return TrainedClassifier(model, cfg, acc, len(train), n_hold, history)


@torch.no_grad()
def classifier_outputs(model: DomainClassifier, samples: torch.Tensor, batch_size: int = 256
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, feature_dim), logits (N, classes)) of samples as `prepare` takes them, in eval mode."""
    model.eval()
    feats = torch.cat([model.features(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)])
    return feats, model.head(feats)


def save_classifier(path, trained: TrainedClassifier):
    meta = {"kind": CHECKPOINT_KIND, "config": to_dict(trained.config),
            "heldout_accuracy": trained.heldout_accuracy, "num_train": trained.num_train,
            "num_heldout": trained.num_heldout, "train_loss": trained.history}
    return save_checkpoint(path, config=meta, weights={"model": trained.model.state_dict()})


def load_classifier(path) -> tuple[DomainClassifier, dict]:
    meta, weights = load_checkpoint(path)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise ValueError(f"{path} holds a {meta.get('kind')!r} checkpoint, not a {CHECKPOINT_KIND!r}; train one "
                         f"with pipelines.metrics.extractors.train_domain_classifier and save_classifier.")
    model = DomainClassifier(from_dict(ClassifierConfig, meta["config"]))
    model.load_state_dict(weights["model"])
    return model.eval(), meta


class ClassifierFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity face of a DomainClassifier checkpoint: uint8 (B, 3, H, W) -> ("features", "logits")."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"feature extractor {name!r} needs feature_extractor_weights_path=<classifier "
                             f"checkpoint dir> (see pipelines/metrics/extractors.py)")
        self.model, _ = load_classifier(feature_extractor_weights_path)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if x.dtype != torch.uint8:
            raise ValueError("ClassifierFeatureExtractor expects uint8 images, as torch-fidelity passes them")
        feats = self.model.features(x)  # (B, feature_dim)
        out = {"features": feats, "logits": self.model.head(feats)}
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)


def register_classifier_extractor(name: str = "digits-classifier") -> str:
    """Register ClassifierFeatureExtractor under `name` with torch-fidelity; a repeat call is a no-op."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    existing = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if existing is None:
        register_feature_extractor(name, ClassifierFeatureExtractor)
    elif existing is not ClassifierFeatureExtractor:
        raise ValueError(f"torch-fidelity already has a different extractor named {name!r}: pick another name")
    return name


def classifier_extractor(checkpoint_dir, name: str = "digits-classifier") -> Extractor:
    """Register (if needed) and describe a classifier checkpoint as an Extractor for pipelines.metrics.fid."""
    _, meta = load_classifier(checkpoint_dir)
    size = meta["config"]["image_size"]
    protocol = f"uint8/127.5-1, bilinear-antialias to {size}x{size}"
    return registered_extractor(register_classifier_extractor(name), str(checkpoint_dir),
                                checkpoint_hash(checkpoint_dir), protocol)
