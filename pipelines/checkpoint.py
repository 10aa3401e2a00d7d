"""Checkpoints: a directory holding everything needed to use (and resume) a model.

    <ckpt>/config.json        {"kind": "tokenizer"|"prior"|..., "config": {...}, ...}: rebuilds the model, no argv
    <ckpt>/model.safetensors  the weights to *use* (the EMA weights where EMA exists; frozen codebooks included)
    <ckpt>/<name>.safetensors further weight sets (raw generator weights, discriminator, ...) for resuming
    <ckpt>/state.pt           optimiser / step / RNG state, read back with torch.load(weights_only=True)

A checkpoint is written into a temp directory and renamed into place (data.files.atomic_path), so an interrupted
write never leaves a half checkpoint where a reader (or --resume) would find it; the previous checkpoint stays
loadable, and the next save of the same name removes the temp directory a killed writer left behind. Nothing here
unpickles arbitrary objects: weights are safetensors and the state file is restricted to tensors and plain
containers (a state.pt that pickles anything else is refused, and nothing of it runs).

Reading one is checked like any user input: a damaged file (invalid JSON, truncated safetensors or state.pt), a
checkpoint from a newer format version, weights that do not fit their own config.json, or a checkpoint of another
kind raise a `UserError` naming the file and the fix (`BadCheckpoint`, `WrongCheckpoint`, `CheckpointNotFound`).
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from data.errors import UserError
from data.files import TEMP_MARK, atomic_path, remove_stale_temps, sha256_file

CHECKPOINT_VERSION = 1  # the newest format this code reads and the one it writes


class CheckpointNotFound(UserError, FileNotFoundError):
    """A path given as a checkpoint (or run directory) that holds none, or only part of one."""


class WrongCheckpoint(UserError, ValueError):
    """A checkpoint of another kind than the command needs (a prior where a tokenizer goes)."""


class BadCheckpoint(UserError, ValueError):
    """A checkpoint directory whose files cannot be used as they are: damaged (an interrupted copy), written by a
    newer version of the project, or weights that do not fit its own config.json."""


class UnsafeCheckpoint(UserError, pickle.UnpicklingError):
    """A state.pt that pickles objects other than tensors and plain containers: refused, nothing of it is run."""


DAMAGED = "the checkpoint is damaged (an interrupted copy or download?): copy it again, or use another checkpoint"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses non-contiguous and shared-storage tensors; a clone per tensor is cheap next to disk I/O.
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def save_checkpoint(path: str | Path, *, config: dict, weights: dict[str, dict[str, torch.Tensor]],
                    state: dict | None = None) -> Path:
    """Write a checkpoint directory atomically. `weights` maps file stem -> state_dict ("model" is required)."""
    path = Path(path)
    if "model" not in weights:
        raise ValueError("save_checkpoint needs weights['model'] (the weights to use)")
    remove_stale_temps(path)  # a killed save of this name left its (possibly GB-sized) temp directory behind
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
    """config.json of a checkpoint directory: a JSON object of a format version this code reads."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointNotFound(
            f"{cfg_file} not found: {path} is not a checkpoint directory (expected config.json + model.safetensors "
            f"written by a training pipeline)")
    try:
        config = json.loads(cfg_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadCheckpoint(f"{cfg_file} is not valid JSON ({e}); {DAMAGED}") from None
    if not isinstance(config, dict):
        raise BadCheckpoint(f"{cfg_file} holds a JSON {type(config).__name__}, not an object; {DAMAGED}")
    version = config.get("checkpoint_version", CHECKPOINT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BadCheckpoint(f"{cfg_file}: checkpoint_version {version!r} is not a format version; {DAMAGED}")
    if version > CHECKPOINT_VERSION:
        raise BadCheckpoint(f"{path} is a version-{version} checkpoint, written by a newer version of this project "
                            f"(this code reads versions up to {CHECKPOINT_VERSION}): update the code, or use a "
                            f"checkpoint written by this version")
    return config


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
        try:
            weights[name] = load_file(str(f), device=map_location)
        except SafetensorError as e:
            raise BadCheckpoint(f"{f} is not a readable safetensors file ({e}); {DAMAGED}") from None
    return config, weights


UNSUPPORTED = re.compile(r"GLOBAL ([\w.]+)|Unsupported operand \d+")  # what torch's weights-only unpickler refused


def load_state(path: str | Path) -> dict[str, Any]:
    """Trainer state (optimiser, step, RNG) — tensors and plain containers only (weights_only=True): a file that
    pickles anything else is refused (`UnsafeCheckpoint`) before any of its objects is built."""
    f = Path(path) / "state.pt"
    if not f.is_file():
        raise CheckpointNotFound(f"{f} not found: checkpoint {path} holds weights only (no optimiser state), so no "
                                 f"run resumes from it; start a new run (another --out, without --loop.resume)")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's own message suggests weights_only=False: never pass that on
        found = UNSUPPORTED.search(str(e))
        what = (f"a reference to `{found.group(1)}`" if found and found.group(1) else
                f"pickle instructions no state file holds ({found.group(0)})" if found else "other objects")
        raise UnsafeCheckpoint(f"{f} is refused (Weights only load failed: it pickles {what}, not only tensors and "
                               f"plain containers); nothing in it was run. A checkpoint written by this project "
                               f"never holds such objects: resume only from checkpoints you wrote") from None
    except (RuntimeError, EOFError, OSError) as e:  # a truncated zip archive, an empty file
        reason = str(e).split(". ")[0] or type(e).__name__  # torch's first sentence; the rest is advice for coders
        raise BadCheckpoint(f"{f} is not a readable state file ({reason}); {DAMAGED}") from None
    if not isinstance(state, dict):
        raise BadCheckpoint(f"{f} holds a {type(state).__name__}, not the trainer's state dict; {DAMAGED}")
    return state


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
    ckpts = [c for c in ckpts if TEMP_MARK not in c.name and ".old-" not in c.name and (c / "config.json").is_file()
             and (c / "model.safetensors").is_file()]  # a directory a killed pruning half-deleted is no checkpoint
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


def model_config(ckpt: Path, config: dict, cls: type):
    """The `cls` dataclass of a checkpoint's config.json "config" section; a missing or unknown section is the
    file's fault (damaged, or written by another version of the project), named as such."""
    from pipelines.config import ConfigError, from_dict
    section = config.get("config")
    if not isinstance(section, dict):
        raise BadCheckpoint(f"{ckpt}/config.json has no model config (its \"config\" object); {DAMAGED}")
    try:
        return from_dict(cls, section)
    except ConfigError as e:
        raise BadCheckpoint(f"{ckpt}/config.json does not describe a {cls.__name__} this code builds ({e}); the "
                            f"checkpoint was written by another version of the project: use that version, or "
                            f"retrain with this one") from None


SAME_SETTINGS = ("The files come from different checkpoints or settings: use the checkpoint directory as it was "
                 "written, with the settings it was trained with")


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], ckpt: Path, name: str = "model",
                 model_from: str = "its config.json describes", fix: str = SAME_SETTINGS) -> None:
    """`model.load_state_dict(state_dict)`, strict; a file that does not fit the model is a `BadCheckpoint` naming
    the file, what differs (instead of torch's lists of every key), where the model came from and the fix."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    reshaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f"{len(found)} {what} (e.g. {', '.join(found[:2])})" for what, found in
                (("tensors missing", missing), ("unexpected tensors", unexpected),
                 ("tensors of another shape, file vs model", reshaped)) if found]
    if problems:
        raise BadCheckpoint(f"{ckpt}/{name}.safetensors does not fit the model {model_from}: {'; '.join(problems)}. "
                            f"{fix}")
    model.load_state_dict(state_dict)


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu"):
    """(VQAutoencoder in eval mode with the exported (EMA) weights, checkpoint dir) — rebuilt from config.json."""
    from tokenizer import TokenizerConfig, build_tokenizer
    from tokenizer.autoencoder import upgrade_tokenizer_config
    ckpt = resolve_checkpoint(path, hint="train one with `python -m pipelines.train_tokenizer`")
    config = load_config(ckpt)
    if config.get("kind") != "tokenizer":
        raise WrongCheckpoint(f"{ckpt} holds a {config.get('kind')!r} checkpoint, not a tokenizer; pass a tokenizer "
                              f"checkpoint or run directory (`python -m pipelines.train_tokenizer` writes one)")
    if isinstance(config.get("config"), dict):
        config = {**config, "config": upgrade_tokenizer_config(config["config"])}
    model = build_tokenizer(model_config(ckpt, config, TokenizerConfig))
    _, weights = load_checkpoint(ckpt)
    load_weights(model, weights["model"], ckpt)  # strict: a missing frozen codebook is an error, never re-drawn
    return model.to(device).eval(), ckpt


def load_prior(path: str | Path, device: str | torch.device = "cpu"):
    """(Prior in eval mode with the exported weights, checkpoint dir, its config.json) — rebuilt from config.json."""
    from prior import PriorConfig, build_prior
    ckpt = resolve_checkpoint(path, hint=PRIOR_HINT)
    config = load_config(ckpt)
    if config.get("kind") != "prior":
        raise WrongCheckpoint(f"{ckpt} holds a {config.get('kind')!r} checkpoint, not a prior; {PRIOR_HINT}")
    prior = build_prior(model_config(ckpt, config, PriorConfig))
    _, weights = load_checkpoint(ckpt)
    load_weights(prior, weights["model"], ckpt)  # strict
    return prior.to(device).eval(), ckpt, config
