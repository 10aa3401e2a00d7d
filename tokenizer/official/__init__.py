"""The paper's released tokenizers (github.com/youngsheen/SimVQ, MIT) as project tokenizers.

    state = read_state_dict(path)                    # .ckpt/.pt/.pth (weights_only) or .safetensors
    fmt = detect_format(state)                       # "image" | "audio", from the key names
    weights = generator_weights(state, FORMATS[fmt].prefixes, ema=True, frozen=FORMATS[fmt].frozen)  # official
                                                     # names, EMA shadows swapped in
    cfg = FORMATS[fmt].infer_config(weights)         # TokenizerConfig inferred from the shapes
    project_state = FORMATS[fmt].convert(weights, cfg)  # project names, strict-loadable into build_tokenizer(cfg)

What the official checkpoints hold: a Lightning `.ckpt` whose `state_dict` is `VQModel.state_dict()` — the generator
(`encoder.*`, `decoder.*` or the audio `backbone.*`/`head.*`, `quantize.*`), the losses (`loss.*`: LPIPS,
discriminators) and, with `use_ema`, LitEma shadows `model_ema.<parameter name without dots>` of every trainable
parameter plus `model_ema.decay`/`model_ema.num_updates`. The official evaluation runs inside `ema_scope()`, i.e. on
the shadows, so they are the weights to convert; the frozen codebook `quantize.embedding.weight` has no shadow (it
never trains) and is taken as it is.

One thing the official code gets wrong is *not* carried over: its `get_codebook_entry` (codes -> latents, used when
decoding tokens) looks codes up in the raw frozen C instead of the effective codebook W(C) that the encoder's search
used; the project's `decode_codes` uses W(C), so decoding a converted model's codes reproduces its reconstruction.
Each modality's module (`image.py`, `audio.py`) supplies `prefixes`, `detect`, `infer_config` and `convert`.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import torch
from safetensors.torch import load_file

from data.errors import UserError

from . import audio, image

EMA_PREFIX = "model_ema."
FROZEN = ("quantize.embedding.weight",)  # never trained, so never shadowed: taken raw in the EMA weights too


class OfficialFormatError(UserError):
    """A file that is not (or not wholly) an official SimVQ checkpoint of a known layout."""


class Format(NamedTuple):
    prefixes: tuple[str, ...]  # generator keys; everything else (losses, EMA shadows, unused modules) is dropped
    detect: Callable[[Mapping[str, torch.Tensor]], bool]
    infer_config: Callable  # generator state (official names) -> TokenizerConfig
    convert: Callable  # (generator state, TokenizerConfig) -> project state dict
    frozen: tuple[str, ...] = FROZEN  # generator keys LitEma does not shadow (frozen tensors, buffers): taken raw


FORMATS: dict[str, Format] = {
    "image": Format(image.PREFIXES, image.detect, image.infer_config, image.convert),
    "audio": Format(audio.PREFIXES, audio.detect, audio.infer_config, audio.convert, audio.FROZEN),
}


class Inert:
    """Stands in for a class a checkpoint pickles besides tensors (Lightning's hyper-parameter containers, omegaconf
    nodes, paths): keeps the arguments and state it is given as plain data, runs none of the original's code."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def read_state_dict(path: str | Path, inert: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: a Lightning `.ckpt` (its `state_dict`), a plain state dict saved with
    torch.save, or safetensors. Pickles are read with `weights_only=True`: a file that pickles anything besides
    tensors and plain containers is refused, naming what it needs, unless `inert` — then each such class is read as
    an `Inert` placeholder (nothing of it is imported or run; the tensors are all that is kept)."""
    path = Path(path)
    if not path.is_file():
        raise OfficialFormatError(f"--ckpt={path}: no such file; pass the official checkpoint (.ckpt, .pt or "
                                  f".safetensors)")
    if path.suffix == ".safetensors":
        return dict(load_file(str(path)))
    allowed: list = []
    while True:
        try:
            with torch.serialization.safe_globals(allowed):
                obj = torch.load(path, map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as e:
            found = UNSUPPORTED_GLOBAL.search(str(e))
            if found is None:
                raise OfficialFormatError(f"--ckpt={path}: not a readable checkpoint ({str(e).splitlines()[-1]})"
                                          ) from None
            name = found.group(1)
            if not inert or len(allowed) > 100:
                raise OfficialFormatError(
                    f"--ckpt={path} pickles a `{name}` object besides tensors; it is not unpickled (that could run "
                    f"code). Rerun with --inert=true to read such objects as inert data (nothing of theirs runs), or "
                    f"save the checkpoint's state_dict with safetensors") from None
            allowed.append((Inert, name))
        except RuntimeError as e:  # a truncated or non-torch file
            raise OfficialFormatError(f"--ckpt={path}: not a readable checkpoint ({str(e).splitlines()[0]})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise OfficialFormatError(f"--ckpt={path} holds no state dict (expected a Lightning checkpoint with "
                                  f"'state_dict', or a dict of tensors)")
    return obj


def detect_format(state: Mapping[str, torch.Tensor], where: str = "the checkpoint") -> str:
    found = [name for name, fmt in FORMATS.items() if fmt.detect(state)]
    if len(found) != 1:
        sample = ", ".join(sorted(state)[:5])
        raise OfficialFormatError(f"{where} is not an official SimVQ tokenizer of a known layout ({sorted(FORMATS)}); "
                                  f"its keys start {sample} …")
    return found[0]


def ema_key(name: str) -> str:
    """LitEma's buffer name for a parameter: `model_ema.` + the name with its dots removed."""
    return EMA_PREFIX + name.replace(".", "")


def generator_weights(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...], ema: bool = True,
                      where: str = "the checkpoint", frozen: tuple[str, ...] = FROZEN) -> dict[str, torch.Tensor]:
    """The generator's weights under their official names: the EMA shadows (`ema`) or the raw ones. A checkpoint
    with shadows for only some trainable tensors is refused: mixing averaged and raw weights gives a model nobody
    trained."""
    raw = {k: v for k, v in state.items() if k.startswith(prefixes)}
    if not ema:
        return raw
    shadows = {k for k in state if k.startswith(EMA_PREFIX)}
    if not shadows:
        raise OfficialFormatError(f"{where} has no EMA weights (no {EMA_PREFIX}* keys); pass --raw=true to convert "
                                  f"its raw weights")
    out, missing = {}, []
    for k, v in raw.items():
        if ema_key(k) in shadows:
            out[k] = state[ema_key(k)]
        elif k in frozen:
            out[k] = v
        else:
            missing.append(k)
    if missing:
        raise OfficialFormatError(f"{where} is half-EMA: {len(missing)} of {len(raw)} generator tensors have no "
                                  f"{EMA_PREFIX} shadow (e.g. {missing[0]}); pass --raw=true to convert the raw "
                                  f"weights instead")
    return out


def check_against(converted: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], where: str) -> None:
    """Same keys and shapes as the project model's state dict, or an error listing the differences."""
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    shapes = [f"{k}: {tuple(converted[k].shape)} vs {tuple(expected[k].shape)}" for k in sorted(set(converted)
              & set(expected)) if converted[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 f"{len(shapes)} of another shape (e.g. {shapes[:2]})" if shapes else ""]
        raise OfficialFormatError(f"{where} does not map onto the project's net: "
                                  + "; ".join(p for p in parts if p))
