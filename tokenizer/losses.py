"""Tokenizer training losses, by name: recon/l1, recon/l2, perceptual/lpips, gan/g, gan/d.

SimVQ's image recipe (docs/SIMVQ_SPEC.md §3): L1 + 1.0 LPIPS(VGG16) + 0.1 non-saturating GAN
(PatchGAN with BatchNorm, hinge D loss, on from step 0) + 1.0 commit. Losses are returned as
`{name: scalar}` and weighted by a dict from the config (`weighted_sum`), under the same keys
that are logged.

LPIPS here is our own implementation of Zhang et al. 2018 ("lin" variant, VGG16): the VGG16
architecture comes from torchvision *without* its download; the backbone and the five linear
heads are read from local files (`LossConfig.vgg16_path`, `LossConfig.lpips_lin_path`).
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F
import torchvision

GENERATOR_LOSSES = ("recon/l1", "recon/l2", "perceptual/lpips", "gan/g", "vq/commit")


@dataclass
class LossConfig:
    # Weight per generator loss name; a zero weight skips the loss (and its network) entirely.
    weights: dict[str, float] = field(default_factory=lambda: {
        "recon/l1": 1.0, "perceptual/lpips": 1.0, "gan/g": 0.1, "vq/commit": 1.0})
    vgg16_path: str = ""       # torchvision vgg16 state_dict, e.g. weights/vgg16-397923af.pth
    lpips_lin_path: str = ""   # LPIPS v0.1 linear heads (lin0..lin4), e.g. weights/lpips_vgg_v0.1.pth
    disc_channels: int = 64    # PatchGAN width of the first layer (pix2pix ndf)
    disc_layers: int = 3       # PatchGAN stride-2 layers; inputs need >= 3 * 2**layers per axis


# --------------------------------------------------------------------------- elementwise losses

def recon_l1(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x_hat - x).abs().mean()


def recon_l2(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x_hat - x).pow(2).mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    # The 0.5 keeps the taming/Open-MAGVIT2 scale that SimVQ's recipe was tuned with.
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    # Open-MAGVIT2/SimVQ: average the patch logits per sample first, then -log sigmoid(mean).
    per_sample = logits_fake.flatten(1).mean(dim=1)  # (B,)
    return F.softplus(-per_sample).mean()


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


# --------------------------------------------------------------------------- LPIPS

# LPIPS's input normalisation (for images in [-1, 1]), from the LPIPS paper's released model.
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)
# torchvision vgg16.features index ranges ending at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_VGG16_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
VGG16_CHANNELS = (64, 128, 256, 512, 512)


class VGG16Features(nn.Module):
    """x (B, 3, H, W) -> the five LPIPS feature maps. Weights come from a torchvision vgg16
    state_dict; `state_dict=None` gives a randomly initialised network (tests only)."""

    def __init__(self, state_dict: dict[str, torch.Tensor] | None):
        super().__init__()
        with torch.device("meta"):  # build the architecture without allocating/initialising 138M params
            features = torchvision.models.vgg16(weights=None).features
        features = features.to_empty(device="cpu")
        if state_dict is None:
            for m in features.modules():
                if isinstance(m, nn.Conv2d):
                    m.reset_parameters()
        else:
            # A full torchvision vgg16 state_dict also holds classifier.*; LPIPS only uses features.*.
            feats = {k.removeprefix("features."): v for k, v in state_dict.items() if k.startswith("features.")}
            if not feats:
                raise ValueError(f"the VGG16 weights hold no 'features.*' keys (found e.g. {list(state_dict)[:4]}); "
                                 "`vgg16_path` must be a torchvision vgg16 state_dict")
            features.load_state_dict(feats)
        self.slices = nn.ModuleList(features[a:b] for a, b in _VGG16_SLICES)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for s in self.slices:
            x = s(x)
            out.append(x)
        return out


class LPIPS(nn.Module):
    """Learned perceptual distance. `backbone(x)` returns one feature map per head; `channels` are
    their widths. Frozen: no parameter trains, and the module stays in eval mode.
    Without loaded heads every channel weighs 1/C (a plain cosine-style distance, for stand-ins)."""

    def __init__(self, backbone: nn.Module, channels: Sequence[int]):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        for head, c in zip(self.heads, channels):
            nn.init.constant_(head.weight, 1.0 / c)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # a frozen metric: a parent's .train() must not switch it

    def load_heads(self, state: dict[str, torch.Tensor]) -> None:
        """Load the LPIPS v0.1 linear-layer file: keys lin{i}.model.1.weight of shape (1, C_i, 1, 1)."""
        expected = [f"lin{i}.model.1.weight" for i in range(len(self.heads))]
        if sorted(state) != sorted(expected):
            raise ValueError(f"LPIPS linear weights: expected keys {expected}, found {sorted(state)}; "
                             "`lpips_lin_path` must be the LPIPS v0.1 vgg.pth file")
        for head, key in zip(self.heads, expected):
            head.weight.copy_(state[key].to(head.weight.dtype))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: (B, 3, H, W) in [-1, 1] -> (B,) distances."""
        if x.shape[1] != 3:
            raise ValueError(f"LPIPS needs 3-channel images, got shape {tuple(x.shape)}; "
                             "set the `perceptual/lpips` weight to 0 for other inputs")
        fx = self.backbone((x - self.shift) / self.scale)
        fy = self.backbone((y - self.shift) / self.scale)
        dist = x.new_zeros(x.shape[0])
        for head, a, b in zip(self.heads, fx, fy):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit length along channels
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            dist = dist + head((a - b).pow(2)).mean(dim=(1, 2, 3))  # (B, 1, h, w) -> (B,)
        return dist


def _load_weights(path: str, setting: str) -> dict[str, torch.Tensor]:
    if not path:
        raise FileNotFoundError(
            f"LPIPS is enabled (weight of `perceptual/lpips` > 0) but `{setting}` is empty. Put the file under "
            f"weights/ and pass --{setting}=PATH, or set the `perceptual/lpips` weight to 0. "
            "Nothing is downloaded at run time.")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"`{setting}`={path!r} does not exist; copy the file there or fix the setting")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(p))
    return torch.load(p, map_location="cpu", weights_only=True)


def build_lpips(vgg16_path: str, lpips_lin_path: str) -> LPIPS:
    """LPIPS(VGG16) from local files: torchvision's vgg16 state_dict and the LPIPS v0.1 heads."""
    vgg = _load_weights(vgg16_path, "vgg16_path")
    heads = _load_weights(lpips_lin_path, "lpips_lin_path")
    lpips = LPIPS(VGG16Features(vgg), VGG16_CHANNELS)
    lpips.load_heads(heads)
    return lpips


# --------------------------------------------------------------------------- PatchGAN

class PatchDiscriminator(nn.Module):
    """pix2pix's NLayerDiscriminator: (B, C, *S) -> patch logits (B, 1, *S'). dims=1 for audio."""

    def __init__(self, in_channels: int = 3, ch: int = 64, n_layers: int = 3, dims: int = 2):
        super().__init__()
        Conv = nn.Conv2d if dims == 2 else nn.Conv1d
        Norm = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        self.dims, self.n_layers = dims, n_layers
        layers: list[nn.Module] = [Conv(in_channels, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        c = ch
        for n in range(1, n_layers + 1):
            c_out = ch * min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last hidden layer keeps the resolution
            layers += [Conv(c, c_out, 4, stride, 1, bias=False), Norm(c_out), nn.LeakyReLU(0.2, True)]
            c = c_out
        layers.append(Conv(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix init: N(0, 0.02) convs, N(1, 0.02) norm scales
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    @property
    def min_input_size(self) -> int:
        # n_layers stride-2 convs divide by 2**n_layers, then two k4/s1/p1 convs each remove 1.
        return 3 * 2**self.n_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[2:]) < self.min_input_size:
            raise ValueError(f"PatchDiscriminator with disc_layers={self.n_layers} needs inputs of at least "
                             f"{self.min_input_size} per axis, got {tuple(x.shape[2:])}; lower `disc_layers`")
        return self.net(x)


# --------------------------------------------------------------------------- the bundle

class TokenizerLosses(nn.Module):
    """Owns the loss networks (LPIPS, discriminator) and computes the named losses.

    Generator step:  losses = {**ae_out.losses, **crit.generator_losses(x, ae_out.x_hat)}
                     weighted_sum(losses, cfg.weights).backward()
    Discriminator:   crit.discriminator_losses(x, ae_out.x_hat)["gan/d"].backward()
    The generator step also leaves gradients on the discriminator: zero them before its own step.
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
            self.lpips = lpips if lpips is not None else build_lpips(cfg.vgg16_path, cfg.lpips_lin_path)
        self.discriminator = None
        if cfg.weights.get("gan/g", 0.0) != 0:
            self.discriminator = PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers, dims)

    def generator_losses(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"recon/l1": recon_l1(x, x_hat), "recon/l2": recon_l2(x, x_hat)}
        if self.lpips is not None:
            out["perceptual/lpips"] = self.lpips(x, x_hat).mean()
        if self.discriminator is not None:
            out["gan/g"] = non_saturating_g_loss(self.discriminator(x_hat))
        return out

    def discriminator_losses(self, x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.discriminator is None:
            raise RuntimeError("no discriminator: the `gan/g` weight is 0, so there is no D step to take")
        logits_real = self.discriminator(x)
        logits_fake = self.discriminator(x_hat.detach())
        return {"gan/d": hinge_d_loss(logits_real, logits_fake),
                "gan/logits_real": logits_real.detach().mean(),
                "gan/logits_fake": logits_fake.detach().mean()}
