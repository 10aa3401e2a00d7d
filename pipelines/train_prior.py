"""Train the autoregressive prior on token shards (the codes of a frozen tokenizer).

    python -m pipelines.train_prior --tokens=runs/digits/tokens --out=runs/digits/prior --loop.steps=2000
    accelerate launch -m pipelines.train_prior --config=configs/prior_b.toml       # several GPUs / nodes
    python -m pipelines.train_prior ... --loop.resume=true                           # after an interruption
    python -m pipelines.train_prior --tokens=https://host/digits/tokens --token_cache=/scratch/tokens ...

`--tokens` is a local directory or a URL (data/shards.py: http(s) base URL, or a `pipe:` command with {} for the
file name). Each split is converted once into contiguous arrays (data.tokens.open_tokens: `<tokens>/cache/`, or
`--token_cache`) that every process maps read-only: the processes of one machine share one copy of the codes.

The prior's vocabulary (model.num_codes = K), length (model.seq_len = prod(grid)) and classes (model.num_classes)
are filled from the token manifest; setting one that disagrees is an error, never a silently different model. The
manifest's identity (tokenizer hash, quantizer, K, grid, class names) travels in the checkpoint under
`train_config.token_manifest`, so `pipelines.sample` can refuse to decode this prior's codes with another tokenizer.

Objective: next-code cross-entropy (teacher forcing behind a class prefix token; prior.next_code_loss), logged as
train/loss and train/accuracy (top-1 per token); val/loss and val/accuracy over the val token split every
loop.eval_every steps. AdamW (betas 0.9/0.95, weight decay 0.05 on matrices only) with linear warm-up and cosine
decay, as LlamaGen trains its GPT priors (arXiv 2406.06525 §3).
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar

import torch

from data.errors import UserError
from data.shards import ManifestError
from data.tokens import ENCODE_HINT, TokenLoader, TokenManifest, TokenSet, open_tokens
from pipelines.cli import run
from pipelines.config import ConfigError, required, to_dict
from pipelines.trainer import LoopConfig, Trainer, check_at_least_one
from prior import PriorConfig, build_prior, count_parameters, next_code_loss

# The PriorConfig fields the token manifest decides, and values that pass PriorConfig's checks until it does.
FROM_MANIFEST = {"num_codes": 2, "seq_len": 1, "num_classes": 0}


@dataclass
class PriorModelSettings(PriorConfig):
    """PriorConfig whose K, L and class count come from the token manifest (`fill_from_manifest`)."""
    num_codes: int | None = None  # K; None = the token manifest's (a value that disagrees with it is an error)
    seq_len: int | None = None  # L = prod(grid); None = the token manifest's
    num_classes: int | None = None  # None = the token manifest's class count (0 = unconditional)

    def __post_init__(self) -> None:
        # Check every other setting now (a typo fails before the tokens are read); K, L, classes once filled.
        unset = {k: v for k, v in FROM_MANIFEST.items() if getattr(self, k) is None}
        PriorConfig(**{**asdict(self), **unset})


@dataclass
class TrainPriorConfig:
    ALIASES: ClassVar[dict[str, str]] = {"resume": "loop.resume"}  # --resume continues the run in --out
    tokens: str = required()  # token shards (python -m pipelines.encode_shards): a directory, http(s) URL or pipe:...{}
    token_cache: str = ""  # where the splits' memory-mapped arrays go; "" = <tokens>/cache (runs/token_cache for a URL)
    out: str = required()  # run directory: checkpoints/, log.jsonl, tb/
    batch_size: int = 64  # sequences per micro-batch per process
    eval_batches: int = 0  # val batches per evaluation; 0 = the whole val split
    weight_decay: float = 0.05  # AdamW decay on weight matrices and embeddings; none on norms and biases
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas; beta2 0.95 keeps transformer training stable
    model: PriorModelSettings = field(default_factory=PriorModelSettings)  # K / L / classes: from the manifest
    # No EMA by default: LlamaGen's priors train without one and the cosine decay already settles the weights;
    # turn it on with --loop.ema_decay=0.999 (evaluation and the exported weights then use the EMA copy).
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(
        steps=2000, lr=3e-4, lr_schedule="cosine", warmup_steps=100, grad_clip=1.0, ema_decay=0.0,
        eval_every=250, ckpt_every=500))

    def __post_init__(self) -> None:
        check_at_least_one(batch_size=self.batch_size)


def fill_from_manifest(cfg: TrainPriorConfig, manifest: TokenManifest) -> TrainPriorConfig:
    """`cfg` with the model's K, L and class count from the token manifest; a value set that disagrees is an error."""
    filled = {"num_codes": manifest.num_codes, "seq_len": manifest.seq_len, "num_classes": len(manifest.class_names)}
    wrong = [f"model.{k}={getattr(cfg.model, k)} but the token manifest says {v}"
             for k, v in filled.items() if getattr(cfg.model, k) not in (None, v)]
    if wrong:
        raise ConfigError(f"{cfg.tokens}/manifest.json: " + "; ".join(wrong) + ". Leave these keys unset (they "
                          "are filled from the token shards) or point --tokens at the shards they describe")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **filled))


def check_labels(tokens: TokenSet, num_classes: int, where: str) -> None:
    if len(tokens.labels) == 0 or num_classes == 0:
        return
    lo, hi = int(tokens.labels.min()), int(tokens.labels.max())
    if lo < 0 or hi >= num_classes:
        raise ManifestError(f"{where}: labels span {lo}..{hi} but the manifest names {num_classes} classes; a "
                            f"class-conditional prior needs a label in [0, {num_classes}) on every sample. "
                            f"{ENCODE_HINT}")


def adamw(model: torch.nn.Module, cfg: TrainPriorConfig) -> torch.optim.AdamW:
    # Decay only tensors with >= 2 dims (matrices, embeddings): decaying norm gains and biases only hurts (nanoGPT).
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.loop.lr, betas=cfg.betas)


def build_train_step(cfg: TrainPriorConfig, trainer: Trainer) -> Callable[[list, int], dict[str, float]]:
    """Build the prior on `trainer` (seeded, so every process starts from the same weights) and return the stage's
    train_step(micro_batches, step): next-code cross-entropy of the prepared (DDP) model, so gradients sync."""
    torch.manual_seed(cfg.loop.seed)
    prior = build_prior(cfg.model)
    trainer.accelerator.print(f"prior {cfg.model.size}: {count_parameters(prior) / 1e6:.2f}M parameters, "
                              f"K={cfg.model.num_codes}, L={cfg.model.seq_len}, classes={cfg.model.num_classes}")
    model = trainer.add("prior", prior, adamw(prior, cfg), ema=True)
    device, conditional = trainer.device, cfg.model.num_classes > 0

    def prior_losses(batch) -> dict[str, torch.Tensor]:
        codes = batch.tokens.to(device)  # (B, L) int64
        out = next_code_loss(model(codes, batch.labels.to(device) if conditional else None), codes)
        return {"train/loss": out.loss, "train/accuracy": out.accuracy}

    def train_step(micro, step: int) -> dict[str, float]:
        return trainer.step("prior", micro, prior_losses, weights={"train/loss": 1.0})

    return train_step


def main(cfg: TrainPriorConfig) -> dict[str, float]:
    manifest = TokenManifest.load(cfg.tokens)
    cfg = fill_from_manifest(cfg, manifest)
    # The run's identity of its inputs, recorded in every checkpoint's train_config: sampling checks it.
    token_manifest = {k: v for k, v in asdict(manifest).items() if k not in ("counts", "shards", "shard_names")}
    full_config = {**to_dict(cfg), "token_manifest": token_manifest}
    trainer = Trainer(cfg.loop, cfg.out, kind="prior", model_config=to_dict(cfg.model), full_config=full_config)
    device, acc = trainer.device, trainer.accelerator
    conditional = cfg.model.num_classes > 0

    with acc.local_main_process_first():  # one process per machine converts the shards, the others map its arrays
        train_set = open_tokens(cfg.tokens, "train", cfg.token_cache)
        val_set = open_tokens(cfg.tokens, "val", cfg.token_cache) if manifest.counts.get("val", 0) > 0 else None
    check_labels(train_set, cfg.model.num_classes, f"{cfg.tokens} (train)")
    if val_set is not None:
        check_labels(val_set, cfg.model.num_classes, f"{cfg.tokens} (val)")

    acc.print(f"{cfg.tokens}: {len(train_set.labels)} train sequences")
    train_step = build_train_step(cfg, trainer)

    def loader(epoch: int, skip: int) -> TokenLoader:
        return TokenLoader(train_set, cfg.batch_size, shuffle=True, seed=cfg.loop.seed, epoch=epoch,
                           skip_batches=skip, rank=acc.process_index, world_size=acc.num_processes)

    epoch_len = len(loader(0, 0))
    if epoch_len == 0:
        raise UserError(f"--tokens={cfg.tokens}: {len(train_set.labels)} train sequences make no full batch of "
                        f"{cfg.batch_size} x {acc.num_processes} processes; lower --batch_size")

    def batches(start: int):
        # A pure function of the micro-batch position: epoch order comes from (seed, epoch), so resume is exact.
        epoch, skip = divmod(start, epoch_len)
        while True:
            yield from loader(epoch, skip)
            epoch, skip = epoch + 1, 0

    def evaluate(step: int) -> dict[str, float]:
        net = trainer.eval_model().eval()  # eval mode: no label dropout, no dropout (fit() restores train mode)
        val = TokenLoader(val_set, cfg.batch_size, shuffle=False, rank=acc.process_index,
                          world_size=acc.num_processes)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # summed loss, summed correct, positions
        for b, batch in enumerate(val):
            if cfg.eval_batches and b >= cfg.eval_batches:
                break
            codes = batch.tokens.to(device)
            with trainer.autocast():
                out = next_code_loss(net(codes, batch.labels.to(device) if conditional else None), codes)
            n = codes.numel()
            sums += torch.tensor([float(out.loss) * n, float(out.accuracy) * n, n], dtype=torch.float64,
                                 device=device)
        sums = acc.reduce(sums, "sum")
        n = max(float(sums[2]), 1.0)
        return {"val/loss": float(sums[0]) / n, "val/accuracy": float(sums[1]) / n}

    final = trainer.fit(batches, train_step, evaluate if val_set is not None else None)
    acc.print({k: round(v, 4) for k, v in final.items() if k.startswith(("train/", "val/"))})
    return final


if __name__ == "__main__":
    run(main, TrainPriorConfig)
