"""Tokenizer models (no I/O, no CLI): encoder/decoder architectures, quantizers, the autoencoder and its losses."""

from .autoencoder import AEOutput, TokenizerConfig, VQAutoencoder, build_tokenizer
from .losses import (DISCRIMINATORS, LPIPS, LossConfig, PatchDiscriminator, TokenizerLosses, VGG16Features,
                     hinge_d_loss, lpips_from_state_dicts, non_saturating_g_loss, weighted_sum)
from .nets import ARCHS, NET_SIZES, Arch, Decoder, Encoder, NetConfig, get_arch, get_net_config
from .quantizers import QUANTIZERS, CodebookUsage, Quantized, build_quantizer

__all__ = [
    "AEOutput", "TokenizerConfig", "VQAutoencoder", "build_tokenizer",
    "DISCRIMINATORS", "LPIPS", "LossConfig", "PatchDiscriminator", "TokenizerLosses", "VGG16Features",
    "hinge_d_loss", "lpips_from_state_dicts", "non_saturating_g_loss", "weighted_sum",
    "ARCHS", "NET_SIZES", "Arch", "Decoder", "Encoder", "NetConfig", "get_arch", "get_net_config",
    "QUANTIZERS", "CodebookUsage", "Quantized", "build_quantizer",
]
