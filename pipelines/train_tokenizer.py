"""Train a VQ tokenizer (SimVQ by default) on media shards.

    python -m pipelines.train_tokenizer --data=runs/digits/shards --out=runs/digits/tokenizer --loop.steps=600
    accelerate launch -m pipelines.train_tokenizer --config=configs/tokenizer_b.toml     # several GPUs / nodes
    python -m pipelines.train_tokenizer ... --resume        # after an interruption (= --loop.resume=true)

Losses (spec §3): recon/l1 + 1.0 perceptual/lpips + 0.1 gan/g (PatchGAN, hinge D) + 1.0 vq/commit, weighted by
`losses.weights`; Adam(lr 1e-4, betas (0.5, 0.9)) for generator and discriminator; EMA 0.999 of the generator, which
evaluation and the exported checkpoint use. Logged every `loop.log_every` steps under the same names, with codebook
utilisation/perplexity over the steps since the last log line; evaluated on the whole val split.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.shards import media_loader, read_manifest, resume_position
from pipelines.config import parse_config, to_dict
from pipelines.lpips_weights import lpips_for_losses
from pipelines.reconstruct import reconstruction_metrics
from pipelines.trainer import LoopConfig, Trainer
from tokenizer import LossConfig, TokenizerConfig, TokenizerLosses, build_tokenizer, weighted_sum
from tokenizer.quantizers import CodebookUsage


@dataclass
class TrainTokenizerConfig:
    ALIASES: ClassVar[dict[str, str]] = {"resume": "loop.resume"}  # --resume continues the run in --out
    data: str = "runs/digits/shards"  # media shard directory (python -m pipelines.make_shards)
    out: str = "runs/digits/tokenizer"  # run directory: checkpoints/, log.jsonl, tb/, recon-*.png
    batch_size: int = 64  # micro-batch per process
    num_workers: int = 0  # DataLoader workers per process
    disc_start: int = 0  # step at which the GAN losses switch on (the paper: 0)
    eval_batches: int = 0  # 0 = the whole val split
    betas: tuple[float, float] = (0.5, 0.9)  # Adam betas for G and D (spec §3)
    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=1000, lr=1e-4))


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Backpropagate through `module` without training it: the discriminator inside the generator's gan/g term.

    Its weights stop requiring grad, so backward computes no gradient for them (it still flows through the module to
    its input, x_hat): no wasted backward into D, and no gradient for DDP's hooks to all-reduce, which they did on
    every generator micro-step, only for the result to be zeroed before D's own step. A DDP module also runs in
    no_sync, so that DDP does not even prepare a gradient sync for this backward.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    no_sync = module.no_sync() if isinstance(module, DistributedDataParallel) else contextlib.nullcontext()
    with no_sync:
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)


def main(argv: list[str] | None = None, base: dict | None = None) -> dict[str, float]:
    cfg = parse_config(TrainTokenizerConfig, argv, base)
    manifest = read_manifest(cfg.data)
    trainer = Trainer(cfg.loop, cfg.out, kind="tokenizer", model_config=to_dict(cfg.model), full_config=to_dict(cfg))
    device = trainer.device

    torch.manual_seed(cfg.loop.seed)  # the same initial weights (and frozen codebook) on every process
    model = build_tokenizer(cfg.model)
    crit = TokenizerLosses(cfg.losses, in_channels=cfg.model.in_channels, dims=cfg.model.dims,
                           lpips=lpips_for_losses(cfg.losses)).to(device)
    g = trainer.add("g", model, torch.optim.Adam(model.parameters(), lr=cfg.loop.lr, betas=cfg.betas), ema=True)
    if crit.discriminator is not None:
        d_model = crit.discriminator
        crit.discriminator = trainer.add(
            "d", d_model, torch.optim.Adam(d_model.parameters(), lr=cfg.loop.lr, betas=cfg.betas))
    usage = CodebookUsage(cfg.model.num_codes, device=device)

    epoch_len = -(-manifest.counts["train"] // (cfg.batch_size * trainer.accelerator.num_processes))

    def batches(start: int):
        epoch, skip = resume_position(start, epoch_len, cfg.num_workers)
        while True:
            yield from media_loader(cfg.data, "train", cfg.batch_size, train=True, seed=cfg.loop.seed, epoch=epoch,
                                    epoch_len=epoch_len, num_workers=cfg.num_workers, skip_batches=skip)
            epoch, skip = epoch + 1, 0

    def train_step(micro, step: int) -> dict[str, float]:
        gan_on = crit.discriminator is not None and step >= cfg.disc_start
        weights = dict(cfg.losses.weights)
        if not gan_on:
            weights["gan/g"] = 0.0
        logs: dict[str, float] = {}
        x_hats = []
        for i, batch in enumerate(micro):
            x = batch.x.to(device)
            # D is in this graph (gan/g, weighted 0 before disc_start) but learns only in its own step below
            d_frozen = contextlib.nullcontext() if crit.discriminator is None else frozen(crit.discriminator)
            with trainer.accumulating("g", last=i == len(micro) - 1), d_frozen:
                with trainer.autocast():
                    out = g(x)
                    losses = {**out.losses, **crit.generator_losses(x, out.x_hat)}
                loss = weighted_sum(losses, weights)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite generator loss at step {step}: "
                                             f"{ {k: float(v) for k, v in losses.items()} }; lower loop.lr or add "
                                             f"loop.warmup_steps / loop.grad_clip, then resume")
                trainer.backward(loss)
            usage.update(out.codes)
            x_hats.append(out.x_hat.detach())
            for k, v in losses.items():
                logs[k] = logs.get(k, 0.0) + float(v.detach()) / len(micro)
        logs.update(trainer.optimizer_step("g"))
        if gan_on:
            for i, (batch, x_hat) in enumerate(zip(micro, x_hats)):
                with trainer.accumulating("d", last=i == len(micro) - 1):
                    with trainer.autocast():
                        d_losses = crit.discriminator_losses(batch.x.to(device), x_hat)
                    trainer.backward(d_losses["gan/d"])
                for k, v in d_losses.items():
                    logs[k] = logs.get(k, 0.0) + float(v.detach()) / len(micro)
            logs.update(trainer.optimizer_step("d"))
        if (step + 1) % cfg.loop.log_every == 0:
            counts = trainer.accelerator.reduce(usage.counts.clone(), "sum")
            window = CodebookUsage(cfg.model.num_codes)
            window.counts = counts.cpu()
            logs.update(window.summary("train/"))
            usage.reset()
        return logs

    def evaluate(step: int) -> dict[str, float]:
        loader = media_loader(cfg.data, "val", cfg.batch_size, train=False)
        return reconstruction_metrics(trainer.eval_model(), loader, device, trainer.accelerator,
                                      max_batches=cfg.eval_batches,
                                      grid_path=Path(cfg.out) / f"recon-{step:07d}.png")

    final = trainer.fit(batches, train_step, evaluate)
    trainer.accelerator.print({k: round(v, 4) for k, v in final.items() if k.startswith("val/")})
    return final


if __name__ == "__main__":
    main()
