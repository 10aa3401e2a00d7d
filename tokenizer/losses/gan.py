"""Adversarial losses on discriminator logits (one tensor per discriminator output, any shape (B, ...)).

The image recipe (docs/SIMVQ_SPEC.md §3) uses the hinge D loss and the non-saturating G loss; audio tokenizers
(HiFi-GAN, Vocos, DAC) add feature matching between the discriminator's hidden activations on real and fake.

Each discriminator kind names its `Objective` (a key of `OBJECTIVES`, the class attribute `objective`; the image
PatchGAN's when it names none): the G and D loss of one sub-discriminator and how a family of them adds up.
The audio recipe (docs/AUDIO_SPEC.md §2, Vocos/WavTokenizer) averages each family: adv_MPD/5 + adv_MRD/3.
"""

from dataclasses import dataclass
from functools import partial
from typing import Callable, Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F


class Scores(NamedTuple):
    """One sub-discriminator's verdict on an input: its logits and the hidden feature maps feature matching compares
    (what a discriminator with feature maps returns, one per sub-discriminator; a PatchGAN returns bare logits)."""
    logits: torch.Tensor
    features: list[torch.Tensor]


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor, scale: float = 0.5) -> torch.Tensor:
    # The 0.5 keeps the taming/Open-MAGVIT2 scale that SimVQ's image recipe was tuned with; the audio recipe
    # (HiFi-GAN/Vocos) takes the plain sum relu(1 - D(x)) + relu(1 + D(x_hat)), scale=1.
    return scale * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    # Open-MAGVIT2/SimVQ: average the patch logits per sample first, then -log sigmoid(mean).
    per_sample = logits_fake.flatten(1).mean(dim=1)  # (B,)
    return F.softplus(-per_sample).mean()


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The audio recipe's G loss (Vocos GeneratorLoss): mean relu(1 - D(x_hat))."""
    return F.relu(1.0 - logits_fake).mean()


def lsgan_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """DAC's least-squares G loss: mean (1 - D(x_hat))^2."""
    return (1.0 - logits_fake).pow(2).mean()


def lsgan_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """DAC's least-squares D loss: mean (1 - D(x))^2 + mean D(x_hat)^2."""
    return (1.0 - logits_real).pow(2).mean() + logits_fake.pow(2).mean()


def feature_matching_loss(feats_real: Sequence[torch.Tensor], feats_fake: Sequence[torch.Tensor],
                          reduction: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """L1(fake, sg(real)) per layer, averaged (default) or summed over the layers (HiFi-GAN/Vocos/DAC sum them):
    the real features are targets, never trained here."""
    if len(feats_real) != len(feats_fake) or not feats_real:
        raise ValueError(f"feature matching needs the same non-zero number of feature maps on both sides, "
                         f"got {len(feats_real)} real and {len(feats_fake)} fake")
    per_layer = torch.stack([F.l1_loss(f, r.detach()) for r, f in zip(feats_real, feats_fake)])
    return per_layer.mean() if reduction == "mean" else per_layer.sum()


@dataclass(frozen=True)
class Objective:
    g: Callable[[torch.Tensor], torch.Tensor]                 # fake logits -> one sub-discriminator's G loss
    d: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (real, fake) logits -> its D loss
    family: Literal["sum", "mean"]  # how a kind's sub-discriminators add up (G, D and feature-matching terms)


OBJECTIVES: dict[str, Objective] = {
    "non-saturating": Objective(non_saturating_g_loss, hinge_d_loss, "sum"),    # the image recipe (PatchGAN)
    "hinge": Objective(hinge_g_loss, partial(hinge_d_loss, scale=1.0), "mean"),  # audio: MPD/5, MRD/3 (Vocos)
    "lsgan": Objective(lsgan_g_loss, lsgan_d_loss, "sum"),                      # DAC's discriminator, as DAC sums
}
