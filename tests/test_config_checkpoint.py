"""Config parsing (unknown keys and wrong types are errors) and atomic checkpoints."""
import json
import os
import pickle
from dataclasses import dataclass, field

import pytest
import torch

from pipelines.checkpoint import latest_checkpoint, load_checkpoint, load_state, save_checkpoint
from pipelines.config import ConfigError, from_dict, parse_config, to_dict


@dataclass
class Inner:
    size: str = "tiny"  # registry name
    mult: tuple[int, ...] = (1, 2)  # channel multipliers


@dataclass
class Outer:
    steps: int = 10  # optimiser steps
    lr: float = 1e-4  # learning rate
    ema: bool = True  # keep an EMA copy
    out: str | None = None  # output dir
    loss_weights: dict[str, float] = field(default_factory=lambda: {"recon/l1": 1.0})
    model: Inner = field(default_factory=Inner)


@dataclass
class Stage:
    model: Inner = field(default_factory=lambda: Inner(size="b", mult=(1, 2, 4)))  # this stage's own defaults


def test_partial_section_keeps_the_parents_defaults():
    assert parse_config(Stage, ["--model.size=s"]).model == Inner(size="s", mult=(1, 2, 4))
    assert parse_config(Stage, []).model == Inner(size="b", mult=(1, 2, 4))


def test_defaults_file_then_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('steps = 5\nlr = 0.5\n[model]\nsize = "b"\nmult = [1, 2, 4]\n')
    cfg = parse_config(Outer, ["--config", str(toml), "--steps=7", "--model.mult=1,1", "--ema=false", "--out", "x"])
    assert cfg == Outer(steps=7, lr=0.5, ema=False, out="x", model=Inner(size="b", mult=(1, 1)))
    assert from_dict(Outer, to_dict(cfg)) == cfg
    assert json.loads(json.dumps(to_dict(cfg)))["model"]["mult"] == [1, 1]
    assert parse_config(Outer, ['--loss_weights={"gan/g": 0.1}']).loss_weights == {"gan/g": 0.1}
    assert parse_config(Outer, ["--out=none"]).out is None


@pytest.mark.parametrize("argv,needle", [
    (["--stepz=3"], "unknown config key stepz"),
    (["--model.sise=b"], "unknown config key model.sise"),
    (["--steps=three"], "steps: expected an integer"),
    (["--lr=fast"], "lr: expected a number"),
    (["--ema=maybe"], "ema: expected true/false"),
    (["steps=3"], "use --key=value"),
])
def test_config_errors_name_the_key(argv, needle):
    with pytest.raises(ConfigError) as e:
        parse_config(Outer, argv)
    assert needle in str(e.value)
    if "unknown" in needle:
        assert "valid keys" in str(e.value)


def test_checkpoint_round_trip_and_latest(tmp_path):
    run = tmp_path / "run"
    sd = {"w": torch.randn(3, 4), "b": torch.arange(3)}
    for step in (10, 20):
        save_checkpoint(run / "checkpoints" / f"step-{step:09d}", config={"kind": "x", "step": step},
                        weights={"model": sd, "raw": {"w": torch.zeros(1)}},
                        state={"step": step, "rng": torch.get_rng_state(), "opt": {"lr": [0.1]}})
    last = latest_checkpoint(run)
    assert last.name == "step-000000020"
    cfg, w = load_checkpoint(last, names=("model", "raw"))
    assert cfg["step"] == 20 and torch.equal(w["model"]["w"], sd["w"]) and torch.equal(w["model"]["b"], sd["b"])
    assert load_state(last)["opt"] == {"lr": [0.1]}


def test_interrupted_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    save_checkpoint(path, config={"v": 1}, weights={"model": {"w": torch.ones(2)}})

    import pipelines.checkpoint as ck

    def crash(*a, **k):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ck.torch, "save", crash)  # dies after the weights, before the state file
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, config={"v": 2}, weights={"model": {"w": torch.zeros(2)}}, state={"step": 1})
    cfg, w = load_checkpoint(path)
    assert cfg["v"] == 1 and torch.equal(w["model"]["w"], torch.ones(2))
    # a half-written directory is never taken for the latest checkpoint
    os.makedirs(tmp_path / "run" / "checkpoints" / "step-000000002.tmp-1")
    save_checkpoint(tmp_path / "run" / "checkpoints" / "step-000000001", config={}, weights={"model": {}})
    assert latest_checkpoint(tmp_path / "run").name == "step-000000001"


class Evil:
    pass


def test_state_file_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "ck"
    save_checkpoint(path, config={}, weights={"model": {}}, state={"obj": Evil()})
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_state(path)  # weights_only=True: no unpickling of arbitrary classes


def test_alias_maps_a_short_flag_to_a_nested_key():
    from pipelines.train_prior import TrainPriorConfig
    from pipelines.train_tokenizer import TrainTokenizerConfig
    paths = {TrainTokenizerConfig: ["--data=d", "--out=o"], TrainPriorConfig: ["--tokens=t", "--out=o"]}
    for cls in (TrainTokenizerConfig, TrainPriorConfig):
        assert parse_config(cls, ["--resume", *paths[cls]]).loop.resume is True
        assert parse_config(cls, paths[cls]).loop.resume is False


def test_shipped_config_files_parse():
    from pathlib import Path

    from pipelines.compare import CompareConfig, stage_config
    from pipelines.train_prior import TrainPriorConfig
    from pipelines.train_tokenizer import TrainTokenizerConfig
    root = Path(__file__).parent.parent / "configs"
    tok = parse_config(TrainTokenizerConfig, ["--config", str(root / "tokenizer_b.toml"), "--data=d", "--out=o"])
    assert tok.model.size == "b" and tok.model.num_codes == 65536 and tok.loop.steps == 250_000
    prior = parse_config(TrainPriorConfig, ["--config", str(root / "prior_b.toml"), "--tokens=t", "--out=o"])
    assert prior.model.size == "gpt-b" and prior.loop.lr_schedule == "cosine"
    cmp = parse_config(CompareConfig, ["--config", str(root / "compare_digits.toml")])
    # every stage table becomes its stage's config, under what compare decides (paths, the preset)
    tok_digits = stage_config(cmp, "tokenizer", data="d", out="x", model={"quantizer": "vq", "num_codes": 256})
    assert isinstance(tok_digits, TrainTokenizerConfig) and tok_digits.out == "x"
    assert tok_digits.losses.weights == {"recon/l1": 1.0, "gan/g": 0.1, "vq/commit": 1.0}
    assert tok_digits.model.quantizer == "vq" and tok_digits.model.num_codes == 256
    assert tok_digits.model.size == TrainTokenizerConfig().model.size  # a partial table keeps the other defaults
    assert stage_config(cmp, "prior", tokens="t", out="p").model.dropout == 0.2
    assert cmp.presets == ("simvq-256", "simvq-1024", "simvq-4096", "vq-256", "vq-1024", "vq-4096")


def test_dict_field_replaces_the_default_whole_from_every_source(tmp_path):
    """Issue 8 item 4: a TOML table for a dict-typed setting used to merge into the defaults (keeping recon/l1,
    perceptual/lpips and gan/g) while the same value on the command line replaced them."""
    from pipelines.train_tokenizer import TrainTokenizerConfig
    want = {"recon/l2": 1.0, "vq/commit": 1.0}
    toml = tmp_path / "ablation.toml"
    toml.write_text('[losses]\nweights = { "recon/l2" = 1, "vq/commit" = 1 }\n')
    inline = tmp_path / "inline.toml"
    inline.write_text('losses = { weights = { "recon/l2" = 1, "vq/commit" = 1 } }\n')
    sources = {
        "toml table": ["--config", str(toml)],
        "toml inline table": ["--config", str(inline)],
        "json on the command line": ['--losses.weights={"recon/l2": 1, "vq/commit": 1}'],
        "dotted keys": ["--losses.weights.recon/l2=1", "--losses.weights.vq/commit=1"],
    }
    for name, argv in sources.items():
        weights = parse_config(TrainTokenizerConfig, [*argv, "--data=d", "--out=o"]).losses.weights
        assert weights == want and all(type(v) is float for v in weights.values()), name
    # a later source replaces an earlier one whole, too; sibling settings of the section keep their defaults
    cfg = parse_config(TrainTokenizerConfig, ["--config", str(toml), '--losses.weights={"recon/l1": 2}',
                                              "--data=d", "--out=o"])
    assert cfg.losses.weights == {"recon/l1": 2.0}
    assert cfg.losses.disc_layers == TrainTokenizerConfig().losses.disc_layers
    # a base dict (how the demo hands settings to compare) behaves the same
    base = {"losses": {"weights": want}, "data": "d", "out": "o"}
    assert parse_config(TrainTokenizerConfig, [], base=base).losses.weights == want


def test_config_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3\n")
    with pytest.raises(ConfigError, match="bad.toml is not valid TOML"):
        parse_config(Outer, ["--config", str(bad)])
    with pytest.raises(ConfigError, match=r"loss_weights: expected a table/dict \(JSON on the command line\)"):
        parse_config(Outer, ["--loss_weights={gan/g: 0.1}"])
    with pytest.raises(ConfigError, match="loss_weights.gan/g: expected a number"):
        parse_config(Outer, ['--loss_weights={"gan/g": "lots"}'])


def test_paths_have_no_demo_defaults(capsys):
    """Issue 9: the demo's dataset is not baked into the stages' defaults: their inputs and outputs are required."""
    from pipelines.evaluate import EvaluateConfig
    from pipelines.train_tokenizer import TrainTokenizerConfig
    with pytest.raises(ConfigError, match=r"missing required setting --data, --out \(no default: see --help\)"):
        parse_config(TrainTokenizerConfig, [])
    with pytest.raises(ConfigError, match="missing required setting --out"):
        parse_config(EvaluateConfig, ["--data=d"])
    with pytest.raises(SystemExit):
        parse_config(TrainTokenizerConfig, ["--help"])
    assert "--data=<required>  (str)" in capsys.readouterr().out
