"""Train a VQ tokenizer (SimVQ by default) on media shards.

    python -m pipelines.train_tokenizer --data=runs/digits/shards --out=runs/digits/tokenizer --loop.steps=600
    accelerate launch -m pipelines.train_tokenizer --config=configs/tokenizer_b.toml     # several GPUs / nodes
    python -m pipelines.train_tokenizer ... --resume        # after an interruption (= --loop.resume=true)
    python -m pipelines.train_tokenizer --data=https://host/inet/shards ...             # shards read over http
    python -m pipelines.train_tokenizer --data='pipe:gsutil cat gs://bucket/inet/shards/{}' ...

    python -m pipelines.train_tokenizer --config=configs/tokenizer_audio_cpu.toml --data=<16 kHz shards> --out=...

Losses (spec §3): recon/l1 + 1.0 perceptual/lpips + 0.1 gan/g (PatchGAN, hinge D) + 1.0 vq/commit, weighted by
`losses.weights`; the audio recipe (AUDIO_SPEC §2, configs/tokenizer_audio_*.toml): 45 recon/mel + 1000 vq/commit +
gan/g + gan/fm over MPD + MRD. gan/g, gan/fm and gan/d add up over `losses.discriminators`, which train as one model
"d" (all of them in one optimiser, one DDP module); before `disc_start` neither the GAN terms nor the D step run.
Adam(lr 1e-4, betas (0.5, 0.9)) for generator and discriminators; EMA 0.999 of the generator, which evaluation and
the exported checkpoint use. Logged every `loop.log_every` steps under the same names, with codebook
utilisation/perplexity over the steps since the last log line; evaluated on the whole val split.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import torch

from data.media import MediaSpec
from data.reader import media_loader, resume_position
from data.shards import check_counts, read_manifest
from pipelines.cli import run
from pipelines.config import ConfigError, required, to_dict
from pipelines.lpips_weights import lpips_for_losses
from pipelines.metrics.reconstruction import reconstruction_metrics
from pipelines.trainer import LoopConfig, Trainer, check_at_least_one
from tokenizer import LossConfig, TokenizerConfig, TokenizerLosses, build_tokenizer, get_arch
from tokenizer.losses import GAN_LOSSES
from tokenizer.quantizers import QUANTIZERS, CodebookUsage


@dataclass
class TrainTokenizerConfig:
    ALIASES: ClassVar[dict[str, str]] = {"resume": "loop.resume"}  # --resume continues the run in --out
    data: str = required()  # media shards (python -m pipelines.make_shards): a directory, http(s) URL or pipe:...{}
    out: str = required()  # run directory: checkpoints/, log.jsonl, tb/, recon-*.png
    batch_size: int = 64  # micro-batch per process
    num_workers: int = 0  # DataLoader workers per process
    shuffle_buffer: int = 1_000  # samples mixed by the train reader (shards are resampled and written shuffled)
    disc_start: int = 0  # step at which the GAN terms and the D step switch on (the paper: 0); before: no D at all
    sample_rate: int = 0  # audio: the rate the recipe expects of the shards (refused otherwise); 0 = theirs
    eval_batches: int = 0  # 0 = the whole val split
    betas: tuple[float, float] = (0.5, 0.9)  # Adam betas for G and D (spec §3)
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=1000, lr=1e-4))

    def __post_init__(self) -> None:
        check_at_least_one(batch_size=self.batch_size)


def check_names(model: TokenizerConfig) -> None:
    """Registry names in the config (quantizer, arch, size) exist: a typo fails in one line, before anything runs."""
    if model.quantizer not in QUANTIZERS:
        raise ConfigError(f"--model.quantizer={model.quantizer!r} is unknown: choose one of {sorted(QUANTIZERS)}")
    try:
        get_arch(model.arch).size(model.size, model.net)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"--model.arch={model.arch!r} --model.size={model.size!r}: {e.args[0]}") from None


def check_media(cfg: TrainTokenizerConfig, spec: MediaSpec) -> None:
    """The model's dims and channels must be the shards' (an RGB tokenizer cannot train on mono audio), and their
    sample rate the recipe's when it names one."""
    if (cfg.model.dims, cfg.model.in_channels) != (spec.dims, spec.channels):
        raise ConfigError(f"--model.dims={cfg.model.dims} --model.in_channels={cfg.model.in_channels} but {cfg.data} "
                          f"holds {spec.modality} (dims {spec.dims}, {spec.channels} channels): set "
                          f"--model.dims={spec.dims} --model.in_channels={spec.channels}")
    if cfg.sample_rate and (spec.modality != "audio" or spec.sample_rate != cfg.sample_rate):
        held = f"{spec.sample_rate} Hz audio" if spec.modality == "audio" else spec.modality
        raise ConfigError(f"--sample_rate={cfg.sample_rate} but {cfg.data} holds {held}: make shards at that rate "
                          f"(python -m pipelines.make_shards --modality=audio --sample_rate={cfg.sample_rate} ...) or "
                          f"set --sample_rate=0")


def build_losses(cfg: TrainTokenizerConfig, sample_rate: int | None = None) -> TokenizerLosses:
    """The loss bundle (recon/mel at the data's `sample_rate`); a setting it refuses (a loss name, LPIPS files,
    discriminator kinds) is a config error."""
    try:
        return TokenizerLosses(cfg.losses, in_channels=cfg.model.in_channels, dims=cfg.model.dims,
                               lpips=lpips_for_losses(cfg.losses), sample_rate=sample_rate)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"--losses: {e.args[0] if isinstance(e, KeyError) else e}") from None


def build_train_step(cfg: TrainTokenizerConfig, trainer: Trainer,
                     sample_rate: int | None = None) -> Callable[[list, int], dict[str, float]]:
    """Build the generator, the loss bundle and its discriminators on `trainer` (seeded, so every process starts from
    the same weights) and return the stage's train_step(micro_batches, step): the G step, then the D step.
    `sample_rate`: the audio shards' (for recon/mel)."""
    device = trainer.device
    torch.manual_seed(cfg.loop.seed)  # the same initial weights (and frozen codebook) on every process
    model = build_tokenizer(cfg.model)
    crit = build_losses(cfg, sample_rate).to(device)
    g = trainer.add("g", model, torch.optim.Adam(model.parameters(), lr=cfg.loop.lr, betas=cfg.betas), ema=True)
    d = None  # every discriminator as one model "d" (Discriminators), called through its DDP wrapper when there is one
    if len(crit.discriminators):
        d = trainer.add("d", crit.discriminators,
                        torch.optim.Adam(crit.discriminators.parameters(), lr=cfg.loop.lr, betas=cfg.betas))
    usage = CodebookUsage(cfg.model.num_codes, device=device)

    def train_step(micro, step: int) -> dict[str, float]:
        gan_on = d is not None and step >= cfg.disc_start
        # Before disc_start the discriminators are not called at all (the mel-only warm start); after, D is in the
        # generator's graph through gan/g and gan/fm, and the trainer keeps it frozen there.
        weights = {**cfg.losses.weights, **({} if gan_on else {k: 0.0 for k in GAN_LOSSES})}
        x_hats = []

        def generator_losses(batch) -> dict[str, torch.Tensor]:
            x = batch.x.to(device)
            out = g(x)
            usage.update(out.codes)
            x_hats.append(out.x_hat.detach())  # the D step below judges these same reconstructions
            return {**out.losses, **crit.generator_losses(x, out.x_hat, d, gan_on)}  # gan_on: the `gan` argument

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
    check_counts(cfg.data, manifest)  # epoch_len and the resume position come from the counts
    trainer = Trainer(cfg.loop, cfg.out, kind="tokenizer", model_config=to_dict(cfg.model), full_config=to_dict(cfg))
    device = trainer.device
    audio = manifest.spec.modality == "audio"
    train_step = build_train_step(cfg, trainer, manifest.spec.sample_rate if audio else None)

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
