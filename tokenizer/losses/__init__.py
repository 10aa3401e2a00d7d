"""Tokenizer training losses: a recipe of named terms weighted by a dict, and the networks they need.

SimVQ's image recipe (docs/SIMVQ_SPEC.md §3): L1 + 1.0 LPIPS(VGG16) + 0.1 non-saturating GAN
(PatchGAN with BatchNorm, hinge D loss, on from step 0) + 1.0 commit. Its audio recipe (docs/AUDIO_SPEC.md §2):
45 mel + 1000 commit + hinge GAN and feature matching over MPD + MRD (+ DAC's discriminator). Losses are returned
as `{name: scalar}` and weighted by a dict from the config (`weighted_sum`), under the same keys that are logged:

    recon/l1, recon/l2   always computed (cheap; logged even at weight 0)
    recon/mel            L1 of log-mel spectrograms (mel.py), when its weight is non-zero (audio only)
    perceptual/lpips     LPIPS(x, x_hat), when its weight is non-zero (RGB images only)
    gan/g, gan/d         the adversarial G and D losses over every discriminator, each kind by its objective
                         (gan.OBJECTIVES: the PatchGAN's non-saturating G / 0.5-hinge D summed; MPD and MRD hinge,
                         each family averaged over its sub-discriminators; DAC least squares, summed);
                         gan/logits_real, gan/logits_fake are diagnostics
    gan/fm               feature matching, sum over layers of mean |f(x) - f(x_hat)|, families as for gan/g
    gan/g/<kind>, gan/fm/<kind>, gan/d/<kind>
                         the same per family, logged for the audio kinds (mpd, mrd, dac: not the image objective)
    vq/commit            comes from the model (AEOutput.losses), not from here

The discriminators are built when gan/g or gan/fm has a non-zero weight.

The discriminators are a dict (`TokenizerLosses.discriminators`, a `Discriminators` module, kinds in `DISCRIMINATORS`),
so the audio recipe's discriminators can sit beside or instead of the PatchGAN; they train as one model. This package
opens no file: LPIPS is passed in already built (`pipelines.lpips_weights.build_lpips` reads the weight files;
`lpips_from_state_dicts` builds it from tensors).

Layout: `lpips.py` (VGG16 features + LPIPS heads), `mel.py` (recon/mel), `discriminators.py` (PatchGAN, registry,
`Discriminators`), `audio_discriminators.py` (mpd, mrd, dac), `gan.py` (adversarial losses and objectives), this file
(config, recon terms, weighting, the `TokenizerLosses` bundle).
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from .discriminators import (DISCRIMINATORS, Discriminators, PatchDiscriminator, build_discriminator,
                             discriminator_logits)
from .gan import (OBJECTIVES, Objective, Scores, feature_matching_loss, hinge_d_loss, hinge_g_loss, lsgan_d_loss,
                  lsgan_g_loss, non_saturating_g_loss)
from .lpips import LPIPS, VGG16_CHANNELS, VGG16Features, lpips_from_state_dicts
from .mel import MelLoss, MultiScaleMelLoss, mel_sizes

GENERATOR_LOSSES = ("recon/l1", "recon/l2", "recon/mel", "recon/mel_ms", "perceptual/lpips", "gan/g", "gan/fm", "vq/commit")
GAN_LOSSES = ("gan/g", "gan/fm")  # the generator terms that need the discriminators (off before disc_start)


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
    # recon/mel (mel.py); the sample rate is the data's. 0 = the paper's 1024 / 256 at 24 kHz, scaled to that rate.
    mel_n_fft: int = 0
    mel_hop: int = 0
    mel_n_mels: int = 100
    # Audio discriminators (audio_discriminators.py); a width multiplies the published channel counts.
    mpd_periods: tuple[int, ...] = (2, 3, 5, 7, 11)  # HiFi-GAN's periods
    mpd_width: float = 1.0     # 1.0: channels 32, 128, 512, 1024, 1024 (41 M parameters); 0.25 on a CPU
    mrd_resolutions: tuple[tuple[int, int, int], ...] = ((1024, 256, 1024), (2048, 512, 2048), (512, 128, 512))
    mrd_width: float = 1.0     # 1.0: 64 channels (UnivNet/Vocos), (n_fft, hop, window) per resolution above
    dac_width: float = 1.0     # DAC's discriminator: 1.0 = its 32 (MRD) / 32..1024 (MPD) channels


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
    `crit.discriminators` is a `Discriminators` module, an nn.ModuleDict (empty when the gan/g and gan/fm weights
    are 0), e.g.
    {"patch": PatchDiscriminator}. Train it as one model; both loss methods take `d=`, the module to call in its place
    (its DDP wrapper, from `Trainer.add`), and call it once per input (x_hat, or x then x_hat).
    The generator step also leaves gradients on the discriminators unless they are frozen: zero them before their step.
    """

    def __init__(self, cfg: LossConfig, in_channels: int = 3, dims: int = 2, lpips: nn.Module | None = None,
                 sample_rate: int | None = None):
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
        self.mel = None
        for name in ("recon/mel", "recon/mel_ms"):
            if cfg.weights.get(name, 0.0) != 0 and (dims != 1 or not sample_rate):
                raise ValueError(f"{name} needs audio (dims=1) and its sample rate, got dims={dims}, "
                                 f"sample_rate={sample_rate}; set the `{name}` weight to 0 for images")
        if cfg.weights.get("recon/mel", 0.0) != 0:
            self.mel = MelLoss(sample_rate, cfg.mel_n_fft, cfg.mel_hop, cfg.mel_n_mels)
        self.mel_ms = None
        if cfg.weights.get("recon/mel_ms", 0.0) != 0:
            self.mel_ms = MultiScaleMelLoss(sample_rate)
        self.discriminators = Discriminators()
        if any(cfg.weights.get(k, 0.0) != 0 for k in GAN_LOSSES):
            if not cfg.discriminators:
                raise ValueError("the `gan/g` or `gan/fm` weight is non-zero but the `discriminators` setting is "
                                 f"empty; name some of {sorted(DISCRIMINATORS)} or set those weights to 0")
            twice = sorted({name for name in cfg.discriminators if cfg.discriminators.count(name) > 1})
            if twice:
                raise ValueError(f"the `discriminators` setting names {twice} more than once; name each kind once")
            for name in cfg.discriminators:
                self.discriminators[name] = build_discriminator(name, cfg, in_channels, dims)
        # the objective of each kind (gan.OBJECTIVES); a discriminator that names none is judged as the PatchGAN
        self.objectives = {name: OBJECTIVES[getattr(m, "objective", "non-saturating")]
                           for name, m in self.discriminators.items()}
        self.feature_matching = cfg.weights.get("gan/fm", 0.0) != 0

    def generator_losses(self, x: torch.Tensor, x_hat: torch.Tensor, d: nn.Module | None = None,
                         gan: bool = True) -> dict[str, torch.Tensor]:
        """Named generator losses; `d` is the module called for `self.discriminators` (e.g. its DDP wrapper).
        gan=False leaves the discriminators out (no gan/* term, no call): the mel-only warm start before disc_start.
        Feature matching calls `d` on x too, without gradient (the real features are targets)."""
        out = {"recon/l1": recon_l1(x, x_hat), "recon/l2": recon_l2(x, x_hat)}
        if self.mel is not None:
            out["recon/mel"] = self.mel(x, x_hat)
        if self.mel_ms is not None:
            out["recon/mel_ms"] = self.mel_ms(x, x_hat)
        if self.lpips is not None:
            out["perceptual/lpips"] = self.lpips(x, x_hat).mean()
        if gan and len(self.discriminators):
            fake = self._judge(d, x_hat)
            out |= self._sum_families("gan/g", {k: [obj.g(_logits(s)) for s in fake[k]]
                                                for k, obj in self.objectives.items()})
            if self.feature_matching:
                with torch.no_grad():
                    real = self._judge(d, x)
                fm = {k: [feature_matching_loss(r.features, f.features, "sum")
                          for r, f in zip(real[k], fake[k]) if isinstance(f, Scores)] for k in self.objectives}
                fm = {k: terms for k, terms in fm.items() if terms}
                if not fm:
                    raise ValueError(f"the `gan/fm` weight is non-zero but none of the discriminators "
                                     f"{list(self.discriminators)} returns feature maps; add mpd, mrd or dac, or set "
                                     f"the `gan/fm` weight to 0")
                out |= self._sum_families("gan/fm", fm)
        return out

    def discriminator_losses(self, x: torch.Tensor, x_hat: torch.Tensor,
                             d: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """The D loss over every discriminator, each kind by its objective; `d` as in `generator_losses`."""
        if not len(self.discriminators):
            raise RuntimeError("no discriminator: the `gan/g` and `gan/fm` weights are 0, so there is no D step")
        real = self._judge(d, x)  # real before fake: BatchNorm statistics see both
        fake = self._judge(d, x_hat.detach())
        out = self._sum_families("gan/d", {k: [obj.d(_logits(r), _logits(f)) for r, f in zip(real[k], fake[k])]
                                           for k, obj in self.objectives.items()})
        real_logits = [_logits(r) for k in real for r in real[k]]
        fake_logits = [_logits(f) for k in fake for f in fake[k]]
        return {**out, "gan/logits_real": torch.stack([r.detach().mean() for r in real_logits]).mean(),
                "gan/logits_fake": torch.stack([f.detach().mean() for f in fake_logits]).mean()}

    def _judge(self, d: nn.Module | None, x: torch.Tensor) -> dict[str, list]:
        """One call of all the discriminators on `x`: {kind: [logits or Scores, one per sub-discriminator]}."""
        out = (self.discriminators if d is None else d)(x)
        return {name: out[name] for name in self.discriminators}

    def _sum_families(self, key: str, terms: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """{key: the total, key/<kind>: per family with feature maps}: a family's terms summed, or averaged when its
        objective says so (the audio recipe's adv_MPD/5 + adv_MRD/3); the total adds the terms in one sum, in order,
        so the PatchGAN's losses are exactly what they were before families."""
        scaled = {k: [t / len(ts) for t in ts] if self.objectives[k].family == "mean" else ts
                  for k, ts in terms.items()}
        out = {key: torch.stack([t for ts in scaled.values() for t in ts]).sum()}
        for k, ts in scaled.items():
            if self.objectives[k] is not OBJECTIVES["non-saturating"]:  # the audio families
                out[f"{key}/{k}"] = torch.stack(ts).sum()
        return out


def _logits(judged: "torch.Tensor | Scores") -> torch.Tensor:
    return judged.logits if isinstance(judged, Scores) else judged


__all__ = ["GENERATOR_LOSSES", "GAN_LOSSES", "LossConfig", "TokenizerLosses", "recon_l1", "recon_l2", "weighted_sum",
           "MelLoss", "mel_sizes",
           "DISCRIMINATORS", "Discriminators", "PatchDiscriminator", "build_discriminator",
           "discriminator_logits",
           "OBJECTIVES", "Objective", "Scores", "feature_matching_loss", "hinge_d_loss", "hinge_g_loss", "lsgan_d_loss",
           "lsgan_g_loss", "non_saturating_g_loss",
           "LPIPS", "VGG16_CHANNELS", "VGG16Features", "lpips_from_state_dicts"]
