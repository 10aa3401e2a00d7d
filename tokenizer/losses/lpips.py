"""LPIPS (Zhang et al. 2018, "lin" variant on VGG16), built from state dicts: this package opens no file.

    lpips = lpips_from_state_dicts(vgg16_state_dict, lin_state_dict)   # (B, 3, H, W) x 2 in [-1, 1] -> (B,)

Our own implementation: the VGG16 architecture comes from torchvision *without* its download, the backbone and the
five linear heads from the state dicts passed in. Reading them from local files is `pipelines.lpips_weights`' job.
"""

from typing import Sequence

import torch
from torch import nn

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
        import torchvision  # here, not at the top: its import costs seconds in every stage that builds no LPIPS
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
        """Load the LPIPS v0.1 linear-layer weights: keys lin{i}.model.1.weight of shape (1, C_i, 1, 1)."""
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


def lpips_from_state_dicts(vgg16: dict[str, torch.Tensor], lin: dict[str, torch.Tensor]) -> LPIPS:
    """LPIPS(VGG16) from torchvision's vgg16 state_dict and the LPIPS v0.1 heads' state_dict."""
    lpips = LPIPS(VGG16Features(vgg16), VGG16_CHANNELS)
    lpips.load_heads(lin)
    return lpips
