"""Training-step throughput and peak memory of the two training stages' real steps, on synthetic batches.

    python -m benchmarks.train_step                                      # CUDA when available: bf16, paper sizes
    python -m benchmarks.train_step --device cpu --tokenizer-size tiny --image 16 --prior-size tiny --seq 16

Each row times the stage's own `build_train_step` (pipelines.train_tokenizer / pipelines.train_prior), i.e.
`Trainer.step` with its accumulation, finiteness check, clipping, scheduler and EMA, with the stage's default loop
settings. Tokenizer: the generator step (L1 + commit + non-saturating GAN; no LPIPS: no VGG weights offline) and the
hinge discriminator step, Adam, EMA 0.999 of the generator. Prior: one next-code cross-entropy step, AdamW, gradient
clipping at 1.0. Mixed precision as the stages choose it: bf16 autocast on CUDA, fp32 on CPU. Median over --steps
after --warmup steps (benchmarks.timer).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from itertools import count
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch
from accelerate import Accelerator

from benchmarks.timer import time_call
from pipelines import train_prior, train_tokenizer
from pipelines.config import parse_config, to_dict
from pipelines.device import resolve_device
from pipelines.trainer import Trainer


class Case(NamedTuple):
    step: Callable[[], dict]  # one training step of the stage on a fixed synthetic batch
    params: int  # parameters of the stage's main model
    trainer: Trainer  # (its save() writes a real checkpoint of the stage)


def stage_trainer(cfg, run_dir: Path, kind: str, device: torch.device) -> Trainer:
    """The stage's Trainer on the asked-for device (an explicit Accelerator, so --device cpu works next to a GPU)."""
    accelerator = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type == "cpu")
    return Trainer(cfg.loop, run_dir, kind=kind, model_config=to_dict(cfg.model), full_config=to_dict(cfg),
                   accelerator=accelerator)


def tokenizer_case(args, device: torch.device, run_dir: Path):
    cfg = parse_config(train_tokenizer.TrainTokenizerConfig, [  # random batches: --data is never read
        "--data=unused", f"--out={run_dir}", f"--batch_size={args.batch}", f"--model.size={args.tokenizer_size}",
        f"--model.num_codes={args.codes}", '--losses.weights={"recon/l1": 1.0, "gan/g": 0.1, "vq/commit": 1.0}',
        f"--losses.disc_layers={3 if args.image >= 24 else 2}"])
    trainer = stage_trainer(cfg, run_dir, "tokenizer", device)
    train_step = train_tokenizer.build_train_step(cfg, trainer)
    batch = SimpleNamespace(x=torch.rand(args.batch, 3, args.image, args.image, device=device) * 2 - 1)
    steps = count()
    return Case(lambda: train_step([batch], next(steps)), sum(p.numel() for p in trainer.unwrap("g").parameters()),
                trainer)


def prior_case(args, device: torch.device, run_dir: Path):
    cfg = parse_config(train_prior.TrainPriorConfig, [  # random batches: --tokens is never read
        "--tokens=unused", f"--out={run_dir}", f"--batch_size={args.prior_batch}", f"--model.size={args.prior_size}",
        f"--model.num_codes={args.codes}", f"--model.seq_len={args.seq}", "--model.num_classes=1000"])
    trainer = stage_trainer(cfg, run_dir, "prior", device)
    train_step = train_prior.build_train_step(cfg, trainer)
    batch = SimpleNamespace(tokens=torch.randint(args.codes, (args.prior_batch, args.seq), device=device),
                            labels=torch.randint(1000, (args.prior_batch,), device=device))
    steps = count()
    return Case(lambda: train_step([batch], next(steps)), sum(p.numel() for p in trainer.unwrap("prior").parameters()),
                trainer)


def row(label: str, n_params: int, batch: int, timing, throughput: str) -> str:
    mem = f"{timing.peak_bytes / 2**30:.1f} GiB" if timing.peak_bytes is not None else "n/a"
    return f"| {label} | {n_params / 1e6:.1f}M | {batch} | {timing.median * 1e3:.0f} ms | {throughput} | {mem} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    ap.add_argument("--tokenizer-size", default="b")
    ap.add_argument("--image", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--codes", type=int, default=65536)
    ap.add_argument("--prior-size", default="gpt-b")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prior-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    device = resolve_device(args.device)
    print(f"command: python -m benchmarks.train_step {' '.join(sys.argv[1:])}")
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch "
          f"{torch.__version__}, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}\n")
    print("| stage step | params | batch | step time | throughput | peak GPU memory |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:  # the trainers write their config.json there
        step, n, _ = tokenizer_case(args, device, Path(tmp) / "tokenizer")
        t = time_call(step, device, repeats=args.steps, warmup=args.warmup)
        print(row(f"tokenizer {args.tokenizer_size}, {args.image}px, K={args.codes:,} (G+D step)", n, args.batch, t,
                  f"{args.batch / t.median:,.0f} img/s"), flush=True)
        step, n, _ = prior_case(args, device, Path(tmp) / "prior")
        t = time_call(step, device, repeats=args.steps, warmup=args.warmup)
        print(row(f"prior {args.prior_size}, L={args.seq}, K={args.codes:,}", n, args.prior_batch, t,
                  f"{args.prior_batch * args.seq / t.median:,.0f} tokens/s"), flush=True)


if __name__ == "__main__":
    main()
