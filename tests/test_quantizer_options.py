"""Each quantizer's options are a typed config section: listed by --help, checked, and equal to the defaults."""
import pytest
import torch

from pipelines.config import ConfigError, describe, from_dict, parse_config, to_dict
from pipelines.train_tokenizer import TrainTokenizerConfig
from tokenizer import QUANTIZERS, TokenizerConfig, build_quantizer, build_tokenizer
from tokenizer.autoencoder import upgrade_tokenizer_config
from tokenizer.quantizers.options import OPTIONS

K = {"fsq": 240, "lfq": 64}  # codebook sizes these quantizers accept
PATHS = ["--data=shards", "--out=run"]  # required by TrainTokenizerConfig


def test_every_registered_quantizer_has_an_options_section():
    assert set(OPTIONS) == set(QUANTIZERS)
    fields = set(to_dict(TokenizerConfig()))
    assert {section for section, _ in OPTIONS.values()} <= fields


def test_help_lists_the_options_and_a_typo_is_an_error():
    text = describe(TrainTokenizerConfig)
    for key in ("--model.simvq.bias=True", "--model.simvq.rotation_trick=False", "--model.ema_vq.decay=0.99",
                "--model.fsq.levels=()", "--model.lfq.entropy_loss_weight=0.1"):
        assert key in text, key
    with pytest.raises(ConfigError, match="unknown config key model.simvq.biass"):
        parse_config(TrainTokenizerConfig, [*PATHS, "--model.simvq.biass=false"])
    with pytest.raises(ConfigError, match="model.ema_vq.decay: expected a number"):
        parse_config(TrainTokenizerConfig, [*PATHS, "--model.ema_vq.decay=slow"])


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_default_section_builds_the_quantizers_own_defaults(name):
    cfg = TokenizerConfig(quantizer=name, num_codes=K.get(name, 64))
    torch.manual_seed(0)
    a = build_quantizer(name, dim=32, num_codes=cfg.num_codes, **cfg.quantizer_options())
    torch.manual_seed(0)
    b = build_quantizer(name, dim=32, num_codes=cfg.num_codes)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_options_reach_the_quantizer():
    cfg = parse_config(TrainTokenizerConfig, [*PATHS, "--model.simvq.bias=false", "--model.simvq.codebook_dim=8"]).model
    q = build_tokenizer(cfg).quantizer
    assert q.proj.bias is None and q.frozen_codebook.shape == (cfg.num_codes, 8)
    cfg = parse_config(TrainTokenizerConfig, [*PATHS, "--model.quantizer=ema-vq", "--model.ema_vq.decay=0.5"]).model
    assert build_tokenizer(cfg).quantizer.decay == 0.5
    cfg = parse_config(TrainTokenizerConfig, [*PATHS, "--model.quantizer=fsq", "--model.num_codes=60",
                                              "--model.fsq.levels=5,4,3"]).model
    assert build_tokenizer(cfg).quantizer.levels == [5, 4, 3]
    # the other quantizers' sections are ignored
    cfg = parse_config(TrainTokenizerConfig, [*PATHS, "--model.quantizer=vq", "--model.simvq.bias=false"]).model
    assert type(build_tokenizer(cfg).quantizer).__name__ == "VQ"


def test_a_checkpoint_config_from_before_the_typed_options_still_loads():
    legacy = {**to_dict(TokenizerConfig()), "quantizer_kwargs": {"bias": False, "beta": 0.5}}
    for section, _ in OPTIONS.values():
        legacy.pop(section)
    cfg = from_dict(TokenizerConfig, upgrade_tokenizer_config(legacy))
    assert cfg.simvq.bias is False and cfg.simvq.beta == 0.5 and cfg.simvq.rotation_trick is False
    with pytest.raises(ConfigError, match="unknown config key quantizer_kwargs"):
        from_dict(TokenizerConfig, legacy)
