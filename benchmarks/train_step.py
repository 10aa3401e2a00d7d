"""Training-step throughput and peak memory of the tokenizer (G + D step) and the prior, on synthetic batches.

    python -m benchmarks.train_step --device cuda                        # bf16 autocast, paper-size models
    python -m benchmarks.train_step --device cpu --tokenizer-size tiny --image 16 --prior-size tiny --seq 16

Tokenizer: one generator step (L1 + commit + non-saturating GAN) and one hinge discriminator step, Adam, as
pipelines.train_tokenizer does them (no LPIPS: no VGG weights offline). Prior: one cross-entropy step, AdamW.
bf16 autocast on CUDA, fp32 on CPU. Median over --steps after --warmup steps.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def timed(step, steps: int, warmup: int, device: str) -> tuple[float, float | None]:
    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return statistics.median(times), peak


def tokenizer_case(args, device: str, autocast):
    from tokenizer import LossConfig, TokenizerConfig, TokenizerLosses, build_tokenizer, weighted_sum
    model = build_tokenizer(TokenizerConfig(size=args.tokenizer_size, num_codes=args.codes)).to(device)
    crit = TokenizerLosses(LossConfig(weights={"recon/l1": 1.0, "gan/g": 0.1, "vq/commit": 1.0},
                                      disc_layers=3 if args.image >= 24 else 2)).to(device)
    g_opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
    d_opt = torch.optim.Adam(crit.discriminators.parameters(), lr=1e-4, betas=(0.5, 0.9))
    x = torch.rand(args.batch, 3, args.image, args.image, device=device) * 2 - 1

    def step():
        with autocast():
            out = model(x)
            losses = {**out.losses, **crit.generator_losses(x, out.x_hat)}
        loss = weighted_sum(losses, crit.cfg.weights)
        g_opt.zero_grad(set_to_none=True)
        loss.backward()
        g_opt.step()
        with autocast():
            d_loss = crit.discriminator_losses(x, out.x_hat.detach())["gan/d"]
        d_opt.zero_grad(set_to_none=True)
        d_loss.backward()
        d_opt.step()
    return step, sum(p.numel() for p in model.parameters())


def prior_case(args, device: str, autocast):
    from prior import PriorConfig, build_prior
    model = build_prior(PriorConfig(size=args.prior_size, num_codes=args.codes, seq_len=args.seq,
                                    num_classes=1000)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95))
    codes = torch.randint(args.codes, (args.prior_batch, args.seq), device=device)
    labels = torch.randint(1000, (args.prior_batch,), device=device)

    def step():
        with autocast():
            loss = model.loss(codes, labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
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
    dev = args.device
    bf16 = dev == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else (
        lambda: torch.autocast("cpu", enabled=False))
    print(f"command: python -m benchmarks.train_step {' '.join(sys.argv[1:])}")
    print(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"{'bf16 autocast' if bf16 else 'fp32'}\n")
    print("| model | params | batch | step time | throughput | peak GPU memory |\n|---|---|---|---|---|---|")
    torch.manual_seed(0)
    step, n = tokenizer_case(args, dev, autocast)
    t, peak = timed(step, args.steps, args.warmup, dev)
    mem = f"{peak:.1f} GiB" if peak is not None else "n/a"
    print(f"| tokenizer {args.tokenizer_size}, {args.image}px, K={args.codes:,} (G+D step) | {n / 1e6:.1f}M | "
          f"{args.batch} | {t * 1e3:.0f} ms | {args.batch / t:,.0f} img/s | {mem} |", flush=True)
    step, n = prior_case(args, dev, autocast)
    t, peak = timed(step, args.steps, args.warmup, dev)
    mem = f"{peak:.1f} GiB" if peak is not None else "n/a"
    print(f"| prior {args.prior_size}, L={args.seq}, K={args.codes:,} | {n / 1e6:.1f}M | {args.prior_batch} | "
          f"{t * 1e3:.0f} ms | {args.prior_batch * args.seq / t:,.0f} tokens/s | {mem} |", flush=True)


if __name__ == "__main__":
    main()
