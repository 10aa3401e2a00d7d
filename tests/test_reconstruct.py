"""Codebook usage next to its token count: the val pass (reconstruction_metrics) and the encode-only train pass
(codebook_usage), on a stub tokenizer whose codes are known in advance."""
import pytest
import torch
import torch.nn as nn

from data.reader import MediaBatch
from tokenizer.autoencoder import AEOutput


class StubTokenizer(nn.Module):
    """Identity reconstruction; the 2x2 grid of codes is image index * 4 + position, so every token is a new code."""

    def __init__(self, num_codes: int):
        super().__init__()
        self.quantizer = nn.Module()
        self.quantizer.num_codes = num_codes
        self.decoder_calls = 0

    def encode(self, x):
        first = x[:, 0, 0, 0].round().long()  # (B,) the image index stored in pixel (0, 0)
        return first.view(-1, 1, 1) * 4 + torch.arange(4).view(1, 2, 2)  # (B, 2, 2)

    def forward(self, x):
        self.decoder_calls += 1
        return AEOutput(x_hat=x, codes=self.encode(x), losses={})


def batches(n_images: int, batch_size: int = 4) -> list[MediaBatch]:
    x = torch.zeros(n_images, 3, 16, 16)  # SSIM needs >= 11 px
    x[:, 0, 0, 0] = torch.arange(n_images).float()  # (N,) each image's index, read back by StubTokenizer.encode
    return [MediaBatch(x[i:i + batch_size], torch.zeros(len(x[i:i + batch_size]), dtype=torch.long), [])
            for i in range(0, n_images, batch_size)]


def test_val_utilisation_comes_with_its_token_count():
    from pipelines.metrics.reconstruction import reconstruction_metrics

    m = reconstruction_metrics(StubTokenizer(64), batches(10), "cpu", modality="image")
    assert m["val/tokens"] == 40 and m["val/utilisation"] == pytest.approx(40 / 64)
    assert m["val/num_codes"] == 64 and m["val/max_utilisation"] == pytest.approx(40 / 64)
    keys = list(m)
    assert keys.index("val/tokens") == keys.index("val/utilisation") + 1  # printed side by side


def test_usage_pass_encodes_only_and_flags_k_above_the_token_count():
    from pipelines.metrics.reconstruction import codebook_usage, usage_note

    model = StubTokenizer(4096)
    m = codebook_usage(model, batches(177, batch_size=64), "cpu")
    assert model.decoder_calls == 0  # encode only
    assert m["usage/tokens"] == 177 * 4 and m["usage/num_codes"] == 4096
    assert m["usage/utilisation"] == pytest.approx(708 / 4096) and m["usage/perplexity"] == pytest.approx(708)
    assert m["usage/max_utilisation"] == pytest.approx(708 / 4096)
    assert usage_note(m, "usage/") == ("usage/utilisation was counted on 708 tokens < K = 4,096 codes: it cannot "
                                       "exceed 17.3%, whatever the tokenizer")
    enough = codebook_usage(StubTokenizer(16), batches(4), "cpu")  # 16 tokens, K = 16
    assert enough["usage/max_utilisation"] == 1.0 and usage_note(enough, "usage/") is None
