"""Codebook utilisation vs codebook size K, SimVQ vs vanilla VQ vs EMA-VQ: the CPU-scale version of Table 1 of
SimVQ (arXiv 2411.02038).

    python -m benchmarks.utilization                                    # writes docs/utilization.{md,png}
    python -m benchmarks.utilization --steps 100 --ks 1024 --quantizers simvq vq --report "" --plot ""   # quicker

Every row runs the project's real stages: `data.shards.write_media_shards` over the built-in `photos` source (random
crops of the scikit-image photos, resized to --size px), then `pipelines.train_tokenizer.main` with the tiny
tokenizer for a fixed number of steps. Only `model.quantizer` and `model.num_codes` change between rows. The GAN and
LPIPS losses are off (weights 0) to save CPU time: the generator loss is recon/l1 + vq/commit only.

Utilisation (codes used at least once / K), perplexity and PSNR come from the training stage's own final evaluation
(`pipelines.metrics.reconstruction.reconstruction_metrics`): one pass over the whole val split with the EMA
weights. A val split of N images on a g x g token grid holds N * g * g tokens, so utilisation cannot exceed
min(1, N * g * g / K); the table prints that bound ("max possible") next to each measurement.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

QUANTIZER_LABELS = {"simvq": "SimVQ", "vq": "VQ", "ema-vq": "EMA-VQ"}


def make_shards(args, shard_dir: Path) -> dict:
    from data.builtin import open_source
    from data.media import MediaSpec
    from data.shards import write_media_shards

    source = open_source("photos", "image", args.size, args.count, args.seed, "none")
    manifest = write_media_shards(source, shard_dir, MediaSpec(modality="image", size=args.size),
                                  val_fraction=args.val_fraction, split_seed=args.seed, overwrite=True,
                                  log=lambda msg: print(msg, file=sys.stderr))
    return dict(manifest.counts)


def train_argv(args, shard_dir: Path, run_dir: Path, quantizer: str, k: int) -> list[str]:
    # GAN and LPIPS weights are 0, so TokenizerLosses builds neither network (CPU budget).
    weights = {"recon/l1": 1.0, "perceptual/lpips": 0.0, "gan/g": 0.0, "vq/commit": 1.0}
    return [f"--data={shard_dir}", f"--out={run_dir}", f"--batch_size={args.batch_size}",
            f"--model.size={args.model_size}", f"--model.quantizer={quantizer}", f"--model.num_codes={k}",
            f"--losses.weights={json.dumps(weights, separators=(',', ':'))}",
            f"--loop.steps={args.steps}", f"--loop.lr={args.lr}", f"--loop.seed={args.seed}",
            f"--loop.log_every={max(1, args.steps // 10)}",
            f"--loop.eval_every={args.steps}", f"--loop.ckpt_every={args.steps}", "--loop.keep_checkpoints=1"]


def run_one(args, shard_dir: Path, quantizer: str, k: int, tokens_per_image: int) -> dict:
    from benchmarks.timer import time_call
    from pipelines import train_tokenizer
    from pipelines.config import parse_config

    run_dir = Path(args.out) / "runs" / f"{quantizer}-K{k}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a scratch run: the trainer refuses a directory with checkpoints
    cfg = parse_config(train_tokenizer.TrainTokenizerConfig, train_argv(args, shard_dir, run_dir, quantizer, k))
    run = time_call(lambda: train_tokenizer.main(cfg))  # one whole training run
    final, seconds = run.result, run.best
    val_tokens = int(final["val/samples"]) * tokens_per_image
    return {"quantizer": quantizer, "K": k, "utilisation": final["val/utilisation"],
            "max_possible": min(1.0, val_tokens / k), "used": k - int(final["val/dead_codes"]),
            "perplexity": final["val/perplexity"], "psnr": final["val/psnr"], "recon_l1": final["val/recon_l1"],
            "val_tokens": val_tokens, "seconds": seconds}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| quantizer | K | utilisation | max possible | codes used | perplexity | PSNR (dB) | val L1 | train s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {QUANTIZER_LABELS.get(r['quantizer'], r['quantizer'])} | {r['K']:,} | "
                     f"{100 * r['utilisation']:.1f}% | {100 * r['max_possible']:.1f}% | {r['used']:,} | "
                     f"{r['perplexity']:,.1f} | {r['psnr']:.2f} | {r['recon_l1']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["K"] for r in rows})
    fig, (ax_u, ax_p) = plt.subplots(1, 2, figsize=(10, 4))
    bound = {r["K"]: r["max_possible"] for r in rows}
    if any(bound[k] < 1.0 for k in ks):  # only worth drawing when the val split cannot cover the codebook
        ax_u.plot(ks, [100 * bound[k] for k in ks], "k:", label="max possible (val tokens / K)")
    for q in dict.fromkeys(r["quantizer"] for r in rows):
        mine = sorted((r for r in rows if r["quantizer"] == q), key=lambda r: r["K"])
        label = QUANTIZER_LABELS.get(q, q)
        ax_u.plot([r["K"] for r in mine], [100 * r["utilisation"] for r in mine], "o-", label=label)
        ax_p.plot([r["K"] for r in mine], [r["psnr"] for r in mine], "o-", label=label)
    for ax in (ax_u, ax_p):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [f"{k:,}" for k in ks])
        ax.set_xlabel("codebook size K")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_u.set_ylabel("codebook utilisation on val (%)")
    ax_u.set_ylim(-3, 103)
    ax_p.set_ylabel("val PSNR (dB)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quantizers", nargs="+", default=["simvq", "vq", "ema-vq"])
    p.add_argument("--ks", nargs="+", type=int, default=[1024, 8192, 65536])
    p.add_argument("--steps", type=int, default=300, help="optimiser steps per run")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam lr (train_tokenizer's default is 1e-4, too slow "
                                                          "for a few hundred steps)")
    p.add_argument("--model-size", default="tiny")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--count", type=int, default=4000, help="photo crops in total (train + val)")
    p.add_argument("--val-fraction", type=float, default=0.5,
                   help="a large val split, so that val tokens / K (the utilisation bound) stays high")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; on a busy 2-core box 2 threads thrash (~4 s/step vs ~0.2 s with 1)")
    p.add_argument("--out", default="runs/utilization", help="scratch directory: shards and one run per row")
    p.add_argument("--report", default="docs/utilization.md", help="markdown report; '' = none")
    p.add_argument("--plot", default="docs/utilization.png", help="figure; '' = none")
    args = p.parse_args()

    import torch
    torch.set_num_threads(args.threads)

    from tokenizer import get_net_config
    from tokenizer.quantizers import QUANTIZERS
    unknown = [q for q in args.quantizers if q not in QUANTIZERS]
    if unknown:
        p.error(f"unknown quantizers {unknown}; choose from {sorted(QUANTIZERS)}")
    f = get_net_config(args.model_size).downsample_factor
    if args.size % f:
        p.error(f"--size {args.size} is not divisible by the {args.model_size} tokenizer's downsampling factor {f}")
    tokens_per_image = (args.size // f) ** 2

    command = " ".join(["python -m benchmarks.utilization", shlex.join(sys.argv[1:])]).rstrip()
    print(command)
    t_start = time.perf_counter()
    shard_dir = Path(args.out) / "shards"
    counts = make_shards(args, shard_dir)
    print(f"shards: {counts} ({args.size}px photo crops, {tokens_per_image} tokens per image)")

    rows = []
    for k in args.ks:
        for q in args.quantizers:
            rows.append(run_one(args, shard_dir, q, k, tokens_per_image))
            r = rows[-1]
            print(f"{q:>6} K={k:>6}: utilisation {100 * r['utilisation']:.1f}% (max {100 * r['max_possible']:.1f}%)"
                  f", perplexity {r['perplexity']:.1f}, PSNR {r['psnr']:.2f} dB, {r['seconds']:.0f} s", flush=True)
    wall = time.perf_counter() - t_start
    table = markdown_table(rows)
    print()
    print(table)
    print(f"\nwall time {wall / 60:.1f} min")

    setting = (f"{args.model_size} tokenizer, {args.size}px photos crops, {args.steps} steps x batch {args.batch_size}, "
               f"lr {args.lr:g}, L1 + commit (no GAN/LPIPS); val = {counts['val']:,} images x {tokens_per_image} "
               f"tokens")
    if args.plot:
        plot(rows, Path(args.plot), setting)
    (Path(args.out) / "results.json").write_text(json.dumps(
        {"command": command, "setting": setting, "shards": counts, "wall_s": wall, "rows": rows}, indent=2))
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(report(command, setting, wall, args.threads, table, rows, args.plot,
                                            Path(args.report)))


def report(command: str, setting: str, wall: float, threads: int, table: str, rows: list[dict], plot_path: str,
           report_path: Path) -> str:
    val_tokens = rows[0]["val_tokens"]
    ks = sorted({r["K"] for r in rows})
    uniform = ", ".join(f"{100 * (1 - math.exp(-val_tokens / k)):.1f}%" for k in ks)
    figure = ""
    if plot_path:
        rel = os.path.relpath(Path(plot_path).resolve(), report_path.resolve().parent)
        figure = f"![utilisation and PSNR vs K]({rel})\n\n"
    return (f"# Codebook utilisation vs K (CPU-scale Table 1)\n\n```\n{command}\n```\n\n{setting}; "
            f"wall time {wall / 60:.1f} min (torch with {threads} thread(s); per-run seconds are noisy on a shared "
            f"CPU).\n\n{table}\n\n{figure}"
            f"Utilisation = codes used at least once / K over one pass of the whole val split ({val_tokens:,} tokens), "
            f"with the EMA weights, as `pipelines.metrics.reconstruction.reconstruction_metrics` computes it for the "
            f"training stage. \"max possible\" = min(1, val tokens / K). It is a loose ceiling: even tokens spread "
            f"uniformly at random over the codebook would leave codes unused, 1 - exp(-val tokens / K) = {uniform} for "
            f"K = {', '.join(f'{k:,}' for k in ks)}.\n")

if __name__ == "__main__":
    main()
