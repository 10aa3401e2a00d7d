"""Train a VQ tokenizer (SimVQ by default) on media shards.

    python -m pipelines.train_tokenizer --data=runs/digits/shards --out=runs/digits/tokenizer --loop.steps=600
    accelerate launch -m pipelines.train_tokenizer --config=configs/tokenizer_b.toml     # several GPUs / nodes
    python -m pipelines.train_tokenizer ... --resume        # after an interruption (= --loop.resume=true)

Losses (spec §3): recon/l1 + 1.0 perceptual/lpips + 0.1 gan/g (PatchGAN, hinge D) + 1.0 vq/commit, weighted by
`losses.weights`; gan/g and gan/d are sums over `losses.discriminators`, which train as one model "d" (all of them in
one optimiser, one DDP module). Adam(lr 1e-4, betas (0.5, 0.9)) for generator and discriminators; EMA 0.999 of the
generator, which evaluation and the exported checkpoint use. Logged every `loop.log_every` steps under the same names,
with codebook utilisation/perplexity over the steps since the last log line; evaluated on the whole val split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch

from data.media import MediaSpec
from data.reader import media_loader, resume_position
from data.shards import read_manifest
from pipelines.cli import run
from pipelines.config import ConfigError, required, to_dict
from pipelines.lpips_weights import lpips_for_losses
from pipelines.metrics.reconstruction import reconstruction_metrics
from pipelines.trainer import LoopConfig, Trainer
from tokenizer import LossConfig, TokenizerConfig, TokenizerLosses, build_tokenizer, get_arch
from tokenizer.quantizers import QUANTIZERS, CodebookUsage


@dataclass
class TrainTokenizerConfig:
    ALIASES: ClassVar[dict[str, str]] = {"resume": "loop.resume"}  # --resume continues the run in --out
    data: str = required()  # media shard directory (python -m pipelines.make_shards)
    out: str = required()  # run directory: checkpoints/, log.jsonl, tb/, recon-*.png
    batch_size: int = 64  # micro-batch per process
    num_workers: int = 0  # DataLoader workers per process
    shuffle_buffer: int = 1_000  # samples mixed by the train reader (shards are resampled and written shuffled)
    disc_start: int = 0  # step at which the GAN losses switch on (the paper: 0)
    eval_batches: int = 0  # 0 = the whole val split
    betas: tuple[float, float] = (0.5, 0.9)  # Adam betas for G and D (spec §3)
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=1000, lr=1e-4))


def check_names(model: TokenizerConfig) -> None:
    """Registry names in the config (quantizer, arch, size) exist: a typo fails in one line, before anything runs."""
    if model.quantizer not in QUANTIZERS:
        raise ConfigError(f"--model.quantizer={model.quantizer!r} is unknown: choose one of {sorted(QUANTIZERS)}")
    try:
        get_arch(model.arch).size(model.size, model.net)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"--model.arch={model.arch!r} --model.size={model.size!r}: {e.args[0]}") from None


def check_media(cfg: TrainTokenizerConfig, spec: MediaSpec) -> None:
    """The model's dims and channels must be the shards' (an RGB tokenizer cannot train on mono audio)."""
    if (cfg.model.dims, cfg.model.in_channels) != (spec.dims, spec.channels):
        raise ConfigError(f"--model.dims={cfg.model.dims} --model.in_channels={cfg.model.in_channels} but {cfg.data} "
                          f"holds {spec.modality} (dims {spec.dims}, {spec.channels} channels): set "
                          f"--model.dims={spec.dims} --model.in_channels={spec.channels}")


def build_losses(cfg: TrainTokenizerConfig) -> TokenizerLosses:
    """The loss bundle; a setting it refuses (a loss name, LPIPS files, discriminator kinds) is a config error."""
    try:
        return TokenizerLosses(cfg.losses, in_channels=cfg.model.in_channels, dims=cfg.model.dims,
                               lpips=lpips_for_losses(cfg.losses))
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"--losses: {e.args[0] if isinstance(e, KeyError) else e}") from None


def build_train_step(cfg: TrainTokenizerConfig, trainer: Trainer) -> Callable[[list, int], dict[str, float]]:
    """Build the generator, the loss bundle and its discriminators on `trainer` (seeded, so every process starts from
    the same weights) and return the stage's train_step(micro_batches, step): the G step, then the D step."""
    device = trainer.device
    torch.manual_seed(cfg.loop.seed)  # the same initial weights (and frozen codebook) on every process
    model = build_tokenizer(cfg.model)
    crit = build_losses(cfg).to(device)
    g = trainer.add("g", model, torch.optim.Adam(model.parameters(), lr=cfg.loop.lr, betas=cfg.betas), ema=True)
    d = None  # every discriminator as one model "d" (Discriminators), called through its DDP wrapper when there is one
    if len(crit.discriminators):
        d = trainer.add("d", crit.discriminators,
                        torch.optim.Adam(crit.discriminators.parameters(), lr=cfg.loop.lr, betas=cfg.betas))
    usage = CodebookUsage(cfg.model.num_codes, device=device)

    def train_step(micro, step: int) -> dict[str, float]:
        gan_on = d is not None and step >= cfg.disc_start
        # D is in the generator's graph (gan/g, weighted 0 before disc_start; the trainer keeps it frozen there)
        weights = {**cfg.losses.weights, **({} if gan_on else {"gan/g": 0.0})}
        x_hats = []

        def generator_losses(batch) -> dict[str, torch.Tensor]:
            x = batch.x.to(device)
            out = g(x)
            usage.update(out.codes)
            x_hats.append(out.x_hat.detach())  # the D step below judges these same reconstructions
            return {**out.losses, **crit.generator_losses(x, out.x_hat, d)}

        logs = trainer.step("g", micro, generator_losses, weights)
        if gan_on:
            fakes = iter(x_hats)
            logs |= trainer.step("d", micro, lambda b: crit.discriminator_losses(b.x.to(device), next(fakes), d),
                                 {"gan/d": 1.0})
        if (step + 1) % cfg.loop.log_every == 0:
            counts = trainer.accelerator.reduce(usage.counts.clone(), "sum")
            window = CodebookUsage(cfg.model.num_codes)
            window.counts = counts.cpu()
            logs.update(window.summary("train/"))
            usage.reset()
        return logs

    return train_step


def main(cfg: TrainTokenizerConfig) -> dict[str, float]:
    check_names(cfg.model)
    manifest = read_manifest(cfg.data)
    check_media(cfg, manifest.spec)
    trainer = Trainer(cfg.loop, cfg.out, kind="tokenizer", model_config=to_dict(cfg.model), full_config=to_dict(cfg))
    device = trainer.device
    train_step = build_train_step(cfg, trainer)

    epoch_len = -(-manifest.counts["train"] // (cfg.batch_size * trainer.accelerator.num_processes))

    def batches(start: int):
        epoch, skip = resume_position(start, epoch_len, cfg.num_workers)
        while True:
            yield from media_loader(cfg.data, "train", cfg.batch_size, train=True, seed=cfg.loop.seed, epoch=epoch,
                                    epoch_len=epoch_len, num_workers=cfg.num_workers, skip_batches=skip,
                                    shuffle_buffer=cfg.shuffle_buffer)
            epoch, skip = epoch + 1, 0

    def evaluate(step: int) -> dict[str, float]:
        loader = media_loader(cfg.data, "val", cfg.batch_size, train=False)
        return reconstruction_metrics(trainer.eval_model(), loader, device, trainer.accelerator,
                                      max_batches=cfg.eval_batches,
                                      grid_path=Path(cfg.out) / f"recon-{step:07d}.png",
                                      modality=manifest.spec.modality)

    final = trainer.fit(batches, train_step, evaluate)
    trainer.accelerator.print({k: round(v, 4) for k, v in final.items() if k.startswith("val/")})
    return final


if __name__ == "__main__":
    run(main, TrainTokenizerConfig)
