"""Checkpoints: a directory holding everything needed to use (and resume) a model.

    <ckpt>/config.json        {"kind": "tokenizer"|"prior"|..., "config": {...}, ...}: rebuilds the model, no argv
    <ckpt>/model.safetensors  the weights to *use* (the EMA weights where EMA exists; frozen codebooks included)
    <ckpt>/<name>.safetensors further weight sets (raw generator weights, discriminator, ...) for resuming
    <ckpt>/state.pt           optimiser / step / RNG state, read back with torch.load(weights_only=True)

A checkpoint is written into a temp directory and renamed into place (data.files.atomic_path), so an interrupted
write never leaves a half checkpoint where a reader (or --resume) would find it; the previous checkpoint stays
loadable. Nothing here unpickles arbitrary objects: weights are safetensors and the state file is restricted to
tensors and plain containers.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from data.errors import UserError
from data.files import TEMP_MARK, atomic_path, sha256_file

CHECKPOINT_VERSION = 1


class CheckpointNotFound(UserError, FileNotFoundError):
    """A path given as a checkpoint (or run directory) that holds none, or only part of one."""


class WrongCheckpoint(UserError, ValueError):
    """A checkpoint of another kind than the command needs (a prior where a tokenizer goes)."""


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses non-contiguous and shared-storage tensors; a clone per tensor is cheap next to disk I/O.
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def save_checkpoint(path: str | Path, *, config: dict, weights: dict[str, dict[str, torch.Tensor]],
                    state: dict | None = None) -> Path:
    """Write a checkpoint directory atomically. `weights` maps file stem -> state_dict ("model" is required)."""
    path = Path(path)
    if "model" not in weights:
        raise ValueError("save_checkpoint needs weights['model'] (the weights to use)")
    with atomic_path(path) as tmp:  # replaces an existing checkpoint of the same name, one copy always on disk
        tmp.mkdir(parents=True)
        for name, sd in weights.items():
            save_file(_contiguous(sd), str(tmp / f"{name}.safetensors"))
        meta = {"checkpoint_version": CHECKPOINT_VERSION, **config}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if state is not None:
            torch.save(state, tmp / "state.pt")
    return path


def load_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointNotFound(
            f"{cfg_file} not found: {path} is not a checkpoint directory (expected config.json + model.safetensors "
            f"written by a training pipeline)")
    return json.loads(cfg_file.read_text())


def load_checkpoint(path: str | Path, names: tuple[str, ...] = ("model",),
                    map_location: str = "cpu") -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(config, {name: state_dict}) of a checkpoint directory."""
    path = Path(path)
    config = load_config(path)
    weights = {}
    for name in names:
        f = path / f"{name}.safetensors"
        if not f.is_file():
            raise CheckpointNotFound(f"{f} missing from checkpoint {path}")
        weights[name] = load_file(str(f), device=map_location)
    return config, weights


def load_state(path: str | Path) -> dict[str, Any]:
    """Trainer state (optimiser, step, RNG) — tensors and plain containers only (weights_only=True)."""
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)


def checkpoint_hash(path: str | Path) -> str:
    """sha256 over config.json and model.safetensors: the identity downstream manifests refer to."""
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        with open(Path(path) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def weights_sha256(path: str | Path) -> str:
    """sha256 of model.safetensors alone: the identity token manifests and sample manifests record for a tokenizer,
    so that rewriting config.json (paths, step) does not orphan the token shards made with these weights."""
    return sha256_file(Path(path) / "model.safetensors")


PRIOR_HINT = "train one with `python -m pipelines.train_prior --tokens=<token shards of this tokenizer>`"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete `step-*` checkpoint in `<run_dir>/checkpoints`, or None."""
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("step-[0-9]*"))
    ckpts = [c for c in ckpts if TEMP_MARK not in c.name and ".old-" not in c.name and (c / "config.json").is_file()]
    return ckpts[-1] if ckpts else None


def resolve_checkpoint(path: str | Path, hint: str = "") -> Path:
    """A checkpoint directory, or a run directory whose newest checkpoint is taken."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointNotFound(f"no checkpoint at {path} (neither a checkpoint directory nor a run directory with "
                                f"checkpoints/step-*){'; ' + hint if hint else ''}")
    return latest


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu"):
    """(VQAutoencoder in eval mode with the exported (EMA) weights, checkpoint dir) — rebuilt from config.json."""
    from pipelines.config import from_dict
    from tokenizer import TokenizerConfig, build_tokenizer
    from tokenizer.autoencoder import upgrade_tokenizer_config
    ckpt = resolve_checkpoint(path, hint="train one with `python -m pipelines.train_tokenizer`")
    config, weights = load_checkpoint(ckpt)
    if config.get("kind") != "tokenizer":
        raise WrongCheckpoint(f"{ckpt} holds a {config.get('kind')!r} checkpoint, not a tokenizer")
    model = build_tokenizer(from_dict(TokenizerConfig, upgrade_tokenizer_config(config["config"])))
    model.load_state_dict(weights["model"])  # strict: a missing frozen codebook is an error, never re-drawn
    return model.to(device).eval(), ckpt


def load_prior(path: str | Path, device: str | torch.device = "cpu"):
    """(Prior in eval mode with the exported weights, checkpoint dir, its config.json) — rebuilt from config.json."""
    from pipelines.config import from_dict
    from prior import PriorConfig, build_prior
    ckpt = resolve_checkpoint(path, hint=PRIOR_HINT)
    config, weights = load_checkpoint(ckpt)
    if config.get("kind") != "prior":
        raise WrongCheckpoint(f"{ckpt} holds a {config.get('kind')!r} checkpoint, not a prior; {PRIOR_HINT}")
    prior = build_prior(from_dict(PriorConfig, config["config"]))
    prior.load_state_dict(weights["model"])  # strict
    return prior.to(device).eval(), ckpt, config
