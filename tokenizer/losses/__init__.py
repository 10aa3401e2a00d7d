"""Tokenizer training losses: a recipe of named terms weighted by a dict, and the networks they need.

SimVQ's image recipe (docs/SIMVQ_SPEC.md §3): L1 + 1.0 LPIPS(VGG16) + 0.1 non-saturating GAN
(PatchGAN with BatchNorm, hinge D loss, on from step 0) + 1.0 commit. Losses are returned as
`{name: scalar}` and weighted by a dict from the config (`weighted_sum`), under the same keys
that are logged:

    recon/l1, recon/l2   always computed (cheap; logged even at weight 0)
    perceptual/lpips     LPIPS(x, x_hat), when its weight is non-zero (RGB images only)
    gan/g, gan/d         non-saturating G loss / hinge D loss, summed over the discriminators, when gan/g's
                         weight is non-zero; gan/logits_real, gan/logits_fake are diagnostics
    vq/commit            comes from the model (AEOutput.losses), not from here

The discriminators are a dict (`TokenizerLosses.discriminators`, a `Discriminators` module, kinds in `DISCRIMINATORS`),
so the audio recipe's discriminators can sit beside or instead of the PatchGAN; they train as one model. This package
opens no file: LPIPS is passed in already built (`pipelines.lpips_weights.build_lpips` reads the weight files;
`lpips_from_state_dicts` builds it from tensors).

Layout: `lpips.py` (VGG16 features + LPIPS heads), `discriminators.py` (PatchGAN, registry, `Discriminators`),
`gan.py` (adversarial losses), this file (config, recon terms, weighting, the `TokenizerLosses` bundle).
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from .discriminators import (DISCRIMINATORS, Discriminators, PatchDiscriminator, build_discriminator,
                             discriminator_logits)
from .gan import feature_matching_loss, hinge_d_loss, non_saturating_g_loss
from .lpips import LPIPS, VGG16_CHANNELS, VGG16Features, lpips_from_state_dicts

GENERATOR_LOSSES = ("recon/l1", "recon/l2", "perceptual/lpips", "gan/g", "vq/commit")


@dataclass
class LossConfig:
    # Weight per generator loss name; a zero weight skips the loss (and its network) entirely.
    weights: dict[str, float] = field(default_factory=lambda: {
        "recon/l1": 1.0, "perceptual/lpips": 1.0, "gan/g": 0.1, "vq/commit": 1.0})
    # LPIPS weight files, read by pipelines.lpips_weights (the tokenizer package opens no file).
    vgg16_path: str = ""       # torchvision vgg16 state_dict, e.g. weights/vgg16-397923af.pth
    lpips_lin_path: str = ""   # LPIPS v0.1 linear heads (lin0..lin4), e.g. weights/lpips_vgg_v0.1.pth
    discriminators: tuple[str, ...] = ("patch",)  # kinds in tokenizer.losses.DISCRIMINATORS, used when gan/g > 0
    disc_channels: int = 64    # PatchGAN width of the first layer (pix2pix ndf)
    disc_layers: int = 3       # PatchGAN stride-2 layers; inputs need >= 3 * 2**layers per axis


# --------------------------------------------------------------------------- terms and their weighting

def recon_l1(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x_hat - x).abs().mean()


def recon_l2(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x_hat - x).pow(2).mean()


def weighted_sum(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """sum(w * losses[k]) over the non-zero weights; a weighted key that was not computed is an error
    (a typo in the config must not silently drop a loss). Unweighted entries are just for logging."""
    missing = [k for k, w in weights.items() if w != 0 and k not in losses]
    if missing:
        raise KeyError(f"loss weights name {missing} but the computed losses are {sorted(losses)}; "
                       f"fix the `weights` setting or set those weights to 0")
    terms = [w * losses[k] for k, w in weights.items() if w != 0]
    if not terms:
        raise ValueError("all loss weights are zero; set at least one entry of the `weights` setting")
    return torch.stack(terms).sum()


# --------------------------------------------------------------------------- the bundle

class TokenizerLosses(nn.Module):
    """Owns the loss networks (LPIPS, the discriminators) and computes the named losses.

    crit = TokenizerLosses(cfg, in_channels, dims, lpips=build_lpips(...))  # lpips: only if its weight is > 0
    Generator step:  losses = {**ae_out.losses, **crit.generator_losses(x, ae_out.x_hat)}
                     weighted_sum(losses, cfg.weights).backward()
    Discriminator:   crit.discriminator_losses(x, ae_out.x_hat)["gan/d"].backward()
    `crit.discriminators` is a `Discriminators` module, an nn.ModuleDict (empty when the gan/g weight is 0), e.g.
    {"patch": PatchDiscriminator}. Train it as one model; both loss methods take `d=`, the module to call in its place
    (its DDP wrapper, from `Trainer.add`), and call it once per input (x_hat, or x then x_hat).
    The generator step also leaves gradients on the discriminators unless they are frozen: zero them before their step.
    """

    def __init__(self, cfg: LossConfig, in_channels: int = 3, dims: int = 2, lpips: nn.Module | None = None):
        super().__init__()
        unknown = sorted(set(cfg.weights) - set(GENERATOR_LOSSES))
        if unknown:
            raise KeyError(f"unknown loss names {unknown} in the `weights` setting; valid: {list(GENERATOR_LOSSES)}")
        self.cfg = cfg
        self.lpips = None
        if cfg.weights.get("perceptual/lpips", 0.0) != 0:
            if dims != 2 or in_channels != 3:
                raise ValueError(f"LPIPS needs RGB images (dims=2, in_channels=3), got dims={dims}, "
                                 f"in_channels={in_channels}; set the `perceptual/lpips` weight to 0")
            if lpips is None:
                raise ValueError("the `perceptual/lpips` weight is non-zero but no LPIPS module was passed: build it "
                                 "with pipelines.lpips_weights.build_lpips(cfg.vgg16_path, cfg.lpips_lin_path) "
                                 "(or tokenizer.losses.lpips_from_state_dicts), or set that weight to 0")
            self.lpips = lpips
        self.discriminators = Discriminators()
        if cfg.weights.get("gan/g", 0.0) != 0:
            if not cfg.discriminators:
                raise ValueError("the `gan/g` weight is non-zero but the `discriminators` setting is empty; "
                                 f"name some of {sorted(DISCRIMINATORS)} or set the `gan/g` weight to 0")
            twice = sorted({name for name in cfg.discriminators if cfg.discriminators.count(name) > 1})
            if twice:
                raise ValueError(f"the `discriminators` setting names {twice} more than once; name each kind once")
            for name in cfg.discriminators:
                self.discriminators[name] = build_discriminator(name, cfg, in_channels, dims)

    def generator_losses(self, x: torch.Tensor, x_hat: torch.Tensor,
                         d: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """Named generator losses; `d` is the module called for `self.discriminators` (e.g. its DDP wrapper)."""
        out = {"recon/l1": recon_l1(x, x_hat), "recon/l2": recon_l2(x, x_hat)}
        if self.lpips is not None:
            out["perceptual/lpips"] = self.lpips(x, x_hat).mean()
        if len(self.discriminators):
            terms = [non_saturating_g_loss(logits) for logits in self._logits(d, x_hat)]
            out["gan/g"] = torch.stack(terms).sum()
        return out

    def discriminator_losses(self, x: torch.Tensor, x_hat: torch.Tensor,
                             d: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The hinge D loss summed over every discriminator's logits; `d` as in `generator_losses`."""
        if not len(self.discriminators):
            raise RuntimeError("no discriminator: the `gan/g` weight is 0, so there is no D step to take")
        real = self._logits(d, x)  # real before fake: BatchNorm statistics see both
        fake = self._logits(d, x_hat.detach())
        return {"gan/d": torch.stack([hinge_d_loss(r, f) for r, f in zip(real, fake)]).sum(),
                "gan/logits_real": torch.stack([r.detach().mean() for r in real]).mean(),
                "gan/logits_fake": torch.stack([f.detach().mean() for f in fake]).mean()}

    def _logits(self, d: nn.Module | None, x: torch.Tensor) -> list[torch.Tensor]:
        """One call of all the discriminators on `x`: their logits flattened, in `self.discriminators` order."""
        out = (self.discriminators if d is None else d)(x)
        return [logits for name in self.discriminators for logits in out[name]]


__all__ = ["GENERATOR_LOSSES", "LossConfig", "TokenizerLosses", "recon_l1", "recon_l2", "weighted_sum",
           "DISCRIMINATORS", "Discriminators", "PatchDiscriminator", "build_discriminator", "discriminator_logits",
           "feature_matching_loss", "hinge_d_loss", "non_saturating_g_loss",
           "LPIPS", "VGG16_CHANNELS", "VGG16Features", "lpips_from_state_dicts"]
