"""Sampling throughput of one prior: our kv cache, no cache, and x-transformers' own `generate`.

Run from the repository root:

    python -m benchmarks.sampling --device cpu --size tiny
    python -m benchmarks.sampling --device cuda --size gpt-b      # bf16 autocast on GPU

All rows decode the same randomly initialised prior (timing does not depend on the weights) for
`--batch` samples of `--seq-len` codes, with the same top-k filter, and report codes per second.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from contextlib import nullcontext

import torch

from benchmarks.timer import time_rows

try:
    from prior import PRIOR_SIZES, PriorConfig, SampleSettings, build_prior, count_parameters, sample
except ModuleNotFoundError as err:  # run as a file, the repository root is not on sys.path
    raise SystemExit(f"{err}: run this from the repository root as `python -m benchmarks.sampling`") from err
from x_transformers import AutoregressiveWrapper


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda runs under bf16 autocast")
    parser.add_argument("--size", default="tiny", choices=sorted(PRIOR_SIZES), help="prior size name")
    parser.add_argument("--seq-len", type=int, default=256, help="codes per sample (16x16 tokens)")
    parser.add_argument("--batch", type=int, default=16, help="samples decoded together")
    parser.add_argument("--num-codes", type=int, default=1024, help="codebook size K")
    parser.add_argument("--num-classes", type=int, default=1000, help="class prefix tokens")
    parser.add_argument("--top-k", type=int, default=100, help="same top-k filter for every row")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per row; the best is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no GPU; use --device cpu")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = PriorConfig(size=args.size, num_codes=args.num_codes, seq_len=args.seq_len, num_classes=args.num_classes)
    prior = build_prior(cfg).to(device).eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    B, L = args.batch, args.seq_len
    labels = torch.arange(B, device=device) % args.num_classes
    seeds = list(range(B))
    ours = SampleSettings(top_k=args.top_k)
    xt_wrapper = AutoregressiveWrapper(prior.net)
    prompts = prior.prefix(labels, B)  # (B, 1) class prefix tokens

    def run_ours(use_cache: bool, cfg_scale: float = 1.0) -> Callable[[], torch.Tensor]:
        settings = SampleSettings(top_k=ours.top_k, cfg_scale=cfg_scale, use_cache=use_cache)

        def go() -> torch.Tensor:
            with autocast:
                return sample(prior, labels, L, settings, seeds)

        return go

    def run_xt() -> torch.Tensor:
        with torch.no_grad(), autocast:
            return xt_wrapper.generate(prompts, L, temperature=1.0, filter_kwargs=dict(k=args.top_k), cache_kv=True)

    rows = {
        "ours, kv cache": run_ours(use_cache=True),
        "ours, no cache": run_ours(use_cache=False),
        "x-transformers generate (kv cache)": run_xt,
        "ours, kv cache, CFG 1.5 (batch doubled)": run_ours(use_cache=True, cfg_scale=1.5),
    }
    # best wall time per row over --repeats rounds after a warm-up round; rows take turns within each round
    seconds = {name: t.best for name, t in time_rows(rows, device, args.repeats, warmup=1).items()}

    params = count_parameters(prior) / 1e6
    gpu = f" ({torch.cuda.get_device_name(device)}, bf16 autocast)" if device.type == "cuda" else ""
    print(f"\nprior {args.size} ({params:.1f}M params), K={args.num_codes}, batch {B}, {L} codes, top-k {args.top_k}, "
          f"device {args.device}{gpu}, torch threads {torch.get_num_threads()}\n")
    print("| decoding | seconds | codes/s | vs no cache |")
    print("|---|---:|---:|---:|")
    uncached = seconds["ours, no cache"]
    for name, secs in seconds.items():
        print(f"| {name} | {secs:.2f} | {B * L / secs:,.0f} | {uncached / secs:.1f}x |")
    print(f"\ncommand: python -m benchmarks.sampling {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main(parse_args())
