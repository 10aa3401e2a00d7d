"""Which formulation of the nearest-code distance is fastest on this device (the choice inside `nearest_codes`).

    python -m benchmarks.distance_variants              # cuda when available, else cpu
    python -m benchmarks.distance_variants --device cpu

Times, for z (N, D) and codebook c (K, D), the bare product z @ c^T, the augmented single GEMM
[z, 1] @ [-2c, ||c||^2]^T (inner dim D+1, and padded to D+8), and addmm(||c||^2, z, c^T, alpha=-2), each alone and
followed by the argmin, and checks that they pick the same codes. Mean of --repeats runs after one warm-up
(benchmarks.timer).
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.timer import time_call
from pipelines.device import resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=65536)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    dev, n, k, d = resolve_device(args.device), args.n, args.k, args.d
    torch.manual_seed(0)
    z, cb = torch.randn(n, d, device=dev), torch.randn(k, d, device=dev)

    def timed(f) -> float:
        return time_call(f, dev, repeats=args.repeats, warmup=1).mean * 1e3

    sq = cb.pow(2).sum(1)  # (K,)
    aug = torch.cat([cb * -2, sq[:, None]], 1)  # (K, D+1)
    z_aug = torch.cat([z, z.new_ones(n, 1)], 1)  # (N, D+1)
    pad = torch.zeros(k, 8, device=dev)
    pad[:, 0] = sq
    aug8 = torch.cat([cb * -2, pad], 1)  # (K, D+8)
    zpad = torch.zeros(n, 8, device=dev)
    zpad[:, 0] = 1
    z_aug8 = torch.cat([z, zpad], 1)  # (N, D+8)
    variants = {
        "augmented, inner dim D+1": lambda: z_aug @ aug.T,
        "augmented, padded to D+8": lambda: z_aug8 @ aug8.T,
        "addmm(||c||^2, z, c^T, alpha=-2)": lambda: torch.addmm(sq, z, cb.T, alpha=-2),
    }
    print(f"command: python -m benchmarks.distance_variants {' '.join(sys.argv[1:])}")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, N={n:,} K={k:,} D={d}, "
          f"tf32 {torch.backends.cuda.matmul.allow_tf32}\n")
    print("| distance formulation | GEMM | GEMM + argmin |\n|---|---|---|")
    print(f"| bare z @ c^T | {timed(lambda: z @ cb.T):.2f} ms | – |")
    picks = []
    for label, f in variants.items():
        gemm = timed(f)
        full = timed(lambda: f().argmin(1))
        picks.append(f().argmin(1))
        print(f"| {label} | {gemm:.2f} ms | {full:.2f} ms |")
    same = all(torch.equal(picks[0], p) for p in picks[1:])
    print(f"\nall variants pick the same codes: {same}")


if __name__ == "__main__":
    main()
