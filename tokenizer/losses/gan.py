"""Adversarial losses on discriminator logits (one tensor per discriminator output, any shape (B, ...)).

The image recipe (docs/SIMVQ_SPEC.md §3) uses the hinge D loss and the non-saturating G loss; audio tokenizers
(HiFi-GAN, EnCodec, DAC) add feature matching between the discriminator's hidden activations on real and fake.
"""

from typing import Sequence

import torch
import torch.nn.functional as F


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    # The 0.5 keeps the taming/Open-MAGVIT2 scale that SimVQ's recipe was tuned with.
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    # Open-MAGVIT2/SimVQ: average the patch logits per sample first, then -log sigmoid(mean).
    per_sample = logits_fake.flatten(1).mean(dim=1)  # (B,)
    return F.softplus(-per_sample).mean()


def feature_matching_loss(feats_real: Sequence[torch.Tensor], feats_fake: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of L1(fake, sg(real)) (HiFi-GAN, DAC): the real features are targets, never trained here."""
    if len(feats_real) != len(feats_fake) or not feats_real:
        raise ValueError(f"feature matching needs the same non-zero number of feature maps on both sides, "
                         f"got {len(feats_real)} real and {len(feats_fake)} fake")
    return torch.stack([F.l1_loss(f, r.detach()) for r, f in zip(feats_real, feats_fake)]).mean()
