"""Tokenizer models (no I/O, no CLI): conv encoder/decoder, quantizers, the autoencoder and its losses."""

from .autoencoder import AEOutput, TokenizerConfig, VQAutoencoder, build_tokenizer
from .losses import (LPIPS, LossConfig, PatchDiscriminator, TokenizerLosses, VGG16Features, build_lpips,
                     hinge_d_loss, non_saturating_g_loss, weighted_sum)
from .nets import NET_SIZES, Decoder, Encoder, NetConfig, get_net_config
from .quantizers import QUANTIZERS, CodebookUsage, Quantized, build_quantizer

__all__ = [
    "AEOutput", "TokenizerConfig", "VQAutoencoder", "build_tokenizer",
    "LPIPS", "LossConfig", "PatchDiscriminator", "TokenizerLosses", "VGG16Features", "build_lpips",
    "hinge_d_loss", "non_saturating_g_loss", "weighted_sum",
    "NET_SIZES", "Decoder", "Encoder", "NetConfig", "get_net_config",
    "QUANTIZERS", "CodebookUsage", "Quantized", "build_quantizer",
]
