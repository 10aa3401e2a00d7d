"""LPIPS(VGG16) from local weight files: the file side of `tokenizer.losses.lpips` (which only takes tensors).

    lpips = build_lpips("weights/vgg16-397923af.pth", "weights/lpips_vgg_v0.1.pth")
    crit = TokenizerLosses(cfg.losses, lpips=lpips_for_losses(cfg.losses))   # None when perceptual/lpips is 0

Both files are read with `torch.load(weights_only=True)` (or safetensors); nothing is downloaded at run time. A file
that loader refuses is a `WeightFileError` naming the setting (nothing in it runs).
"""

import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError

from data.errors import UserError
from tokenizer.losses import LPIPS, LossConfig, lpips_from_state_dicts


class WeightFileError(UserError, ValueError):
    """A weight file that the weights-only loader refuses (a pickle of other objects, a damaged or foreign file)."""


def load_weight_file(path: str, setting: str) -> dict[str, torch.Tensor]:
    """A state dict from a .pth (weights only) or .safetensors file; `setting` names the option that gave the path."""
    if not path:
        raise FileNotFoundError(
            f"LPIPS is enabled (weight of `perceptual/lpips` > 0) but `{setting}` is empty. Put the file under "
            f"weights/ and pass --{setting}=PATH, or set the `perceptual/lpips` weight to 0. "
            "Nothing is downloaded at run time.")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"`{setting}`={path!r} does not exist; copy the file there or fix the setting")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p))
        return torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, SafetensorError) as e:  # nothing ran
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WeightFileError(f"`{setting}`={path}: not a weights-only state dict file ({reason}); point it at the "
                              f"weight file itself (.pth or .safetensors)") from None


def build_lpips(vgg16_path: str, lin_path: str) -> LPIPS:
    """LPIPS(VGG16) from torchvision's vgg16 state_dict file and the LPIPS v0.1 heads file."""
    return lpips_from_state_dicts(load_weight_file(vgg16_path, "vgg16_path"),
                                  load_weight_file(lin_path, "lpips_lin_path"))


def lpips_for_losses(cfg: LossConfig) -> LPIPS | None:
    """The LPIPS module `TokenizerLosses(cfg, lpips=...)` needs: built from cfg's files when the `perceptual/lpips`
    weight is non-zero, else None (no file is read)."""
    if cfg.weights.get("perceptual/lpips", 0.0) == 0:
        return None
    return build_lpips(cfg.vgg16_path, cfg.lpips_lin_path)
