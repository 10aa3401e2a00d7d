"""An official SimVQ checkpoint (the paper's released tokenizers) -> a project tokenizer checkpoint.

    python -m pipelines.import_official --ckpt=downloads/simvq_1k.ckpt --out=runs/official/simvq-1k

Reads a Lightning `.ckpt` (its `state_dict`), a plain state dict (`.pt`/`.pth`) or `.safetensors`, never unpickling
anything but tensors and plain containers (`--inert=true` reads other pickled objects as inert data); takes the EMA
weights the official evaluation uses (`--raw=true` for the raw ones) and refuses a half-EMA file; infers the widths, K
and D from the tensor shapes; writes `<out>/config.json` + `model.safetensors` like any trained tokenizer, so
`reconstruct`, `encode_shards`, `train_prior`, `sample`, `evaluate` and `compare --tokenizers` take it as it is.
`config.json` records the source file's sha256 under `source`. What is converted, and why it computes the same as
the official code: tokenizer/official/.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from data.errors import UserError
from data.files import sha256_file
from pipelines.checkpoint import checkpoint_hash, load_tokenizer, save_checkpoint
from pipelines.cli import run
from pipelines.config import required, to_dict
from tokenizer import build_tokenizer
from tokenizer.official import (FORMATS, OfficialFormatError, check_against, detect_format, generator_weights,
                                read_state_dict)

OFFICIAL_REPO = "github.com/youngsheen/SimVQ"


@dataclass
class ImportOfficialConfig:
    ckpt: str = required()  # the official checkpoint: Lightning .ckpt, torch state dict (.pt/.pth) or .safetensors
    out: str = required()  # project tokenizer checkpoint directory to write
    raw: bool = False  # convert the raw weights instead of the EMA shadows (model_ema.*) the official evaluation uses
    inert: bool = False  # read pickled objects other than tensors (hyper-parameters, paths) as inert data
    overwrite: bool = False  # replace an existing checkpoint at `out`


def convert_checkpoint(path: str | Path, raw: bool = False, inert: bool = False):
    """(TokenizerConfig, the project model holding the converted weights, format name) of an official checkpoint."""
    where = f"--ckpt={path}"
    state = read_state_dict(path, inert=inert)
    name = detect_format(state, where)
    fmt = FORMATS[name]
    weights = generator_weights(state, fmt.prefixes, ema=not raw, where=where, frozen=fmt.frozen)
    try:
        cfg = fmt.infer_config(weights)
    except KeyError as e:
        raise OfficialFormatError(f"{where}: an official {name} tokenizer lacks {e.args[0]!r}; the file is "
                                  f"incomplete or of another layout") from None
    converted = fmt.convert(weights, cfg)
    model = build_tokenizer(cfg)
    check_against(converted, model.state_dict(), where)
    model.load_state_dict(converted)  # strict; the same dict was checked key by key above
    return cfg, model, name


def main(cfg: ImportOfficialConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise UserError(f"--out={out} exists; pass --overwrite=true to replace it, or another --out")
    tok_cfg, model, name = convert_checkpoint(cfg.ckpt, raw=cfg.raw, inert=cfg.inert)
    source = {"repo": OFFICIAL_REPO, "format": name, "path": str(Path(cfg.ckpt).resolve()),
              "sha256": sha256_file(cfg.ckpt), "weights": "raw" if cfg.raw else "ema"}
    meta = {"kind": "tokenizer", "config": to_dict(tok_cfg), "source": source, "train_config": {}}
    save_checkpoint(out, config=meta, weights={"model": model.state_dict()})
    load_tokenizer(out)  # the written checkpoint loads as any tokenizer does
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"out": str(out), "format": name, "weights": source["weights"], "num_codes": tok_cfg.num_codes,
                      "dim": model.quantizer.dim, "downsample_factor": model.downsample_factor, "arch": tok_cfg.arch,
                      "size": tok_cfg.size, "net": tok_cfg.net, "parameters": params,
                      "source_sha256": source["sha256"], "checkpoint_sha256": checkpoint_hash(out)}, indent=2))
    return out


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main, ImportOfficialConfig)
