"""Sampling throughput of one prior: our kv cache (eager, and as a CUDA graph), no cache, and x-transformers' own
`generate`.

Run from the repository root:

    python -m benchmarks.sampling --device cpu --size tiny
    python -m benchmarks.sampling --device cuda --size gpt-b      # bf16 autocast on GPU

All rows decode the same randomly initialised prior (timing does not depend on the weights) for
`--batch` samples of `--seq-len` codes, with the same top-k filter, and report codes per second. The CUDA-graph row
(`SampleSettings.cuda_graph`) replays one captured decode step per token on a GPU, capture included in its time; on
the CPU the same static-buffer step runs eagerly.
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
    from prior import PRIOR_SIZES, Prior, PriorConfig, SampleSettings, build_prior, count_parameters, sample
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


NO_CACHE, CACHE, GRAPH, XT = ("ours, no cache", "ours, kv cache", "ours, kv cache + CUDA graph",
                               "x-transformers generate (kv cache)")


def autocast_for(device: torch.device):
    """What pipelines.sample runs the prior under: bf16 autocast on CUDA, nothing on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def decoders(prior: Prior, batch: int, num_tokens: int, top_k: int,
             cfg_scales: tuple[float, ...] = ()) -> dict[str, Callable[[], torch.Tensor]]:
    """The timed rows, each decoding `batch` samples of `num_tokens` codes (labels 0, 1, ... and seeds 0, 1, ...):
    no cache, kv cache, kv cache + CUDA graph, x-transformers' generate, then the kv cache under each CFG scale."""
    device = next(prior.parameters()).device
    autocast = autocast_for(device)
    labels = torch.arange(batch, device=device) % prior.cfg.num_classes
    seeds = list(range(batch))
    xt_wrapper = AutoregressiveWrapper(prior.net)
    prompts = prior.prefix(labels, batch)  # (B, 1) class prefix tokens

    def run_ours(**settings) -> Callable[[], torch.Tensor]:
        settings = SampleSettings(top_k=top_k, **settings)

        def go() -> torch.Tensor:
            with autocast:
                return sample(prior, labels, num_tokens, settings, seeds)

        return go

    def run_xt() -> torch.Tensor:
        with torch.no_grad(), autocast:
            return xt_wrapper.generate(prompts, num_tokens, temperature=1.0, filter_kwargs=dict(k=top_k),
                                       cache_kv=True)

    graph = GRAPH if device.type == "cuda" else "ours, kv cache, static step (the CUDA-graph path, eager on CPU)"
    rows = {CACHE: run_ours(), NO_CACHE: run_ours(use_cache=False), graph: run_ours(cuda_graph=True), XT: run_xt}
    for scale in cfg_scales:
        rows[f"ours, kv cache, CFG {scale:g} (batch doubled)"] = run_ours(cfg_scale=scale)
    return rows


def main(args: argparse.Namespace) -> None:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no GPU; use --device cpu")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = PriorConfig(size=args.size, num_codes=args.num_codes, seq_len=args.seq_len, num_classes=args.num_classes)
    prior = build_prior(cfg).to(device).eval()
    B, L = args.batch, args.seq_len
    rows = decoders(prior, B, L, args.top_k, cfg_scales=(1.5,))
    # best wall time per row over --repeats rounds after a warm-up round; rows take turns within each round
    seconds = {name: t.best for name, t in time_rows(rows, device, args.repeats, warmup=1).items()}

    params = count_parameters(prior) / 1e6
    gpu = f" ({torch.cuda.get_device_name(device)}, bf16 autocast)" if device.type == "cuda" else ""
    print(f"\nprior {args.size} ({params:.1f}M params), K={args.num_codes}, batch {B}, {L} codes, top-k {args.top_k}, "
          f"device {args.device}{gpu}, torch threads {torch.get_num_threads()}\n")
    print("| decoding | seconds | codes/s | vs no cache |")
    print("|---|---:|---:|---:|")
    uncached = seconds[NO_CACHE]
    for name, secs in seconds.items():
        print(f"| {name} | {secs:.2f} | {B * L / secs:,.0f} | {uncached / secs:.1f}x |")
    print(f"\ncommand: python -m benchmarks.sampling {shlex.join(sys.argv[1:])}")


if __name__ == "__main__":
    main(parse_args())
