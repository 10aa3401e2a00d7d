"""Fit each quantizer to a stream of real image patches and watch the codebook: SimVQ vs vanilla VQ vs EMA-VQ.

    python -m benchmarks.quantizer_fit                         # K = 1,024 and 16,384, 300 steps each
    python -m benchmarks.quantizer_fit --steps 100 --ks 1024   # quicker

Patches: 8x8 RGB crops of the colour photos shipped with scikit-image (astronaut, coffee, chelsea, rocket, ...),
flattened to 192-d and pushed through a learnable linear encoder (192 -> D) and decoder (D -> 192), so the only
difference between rows is the quantizer. Utilisation and perplexity are measured on 16,384 held-out patches after
training (codes used at least once / K), and MSE is the held-out reconstruction error. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from torch import nn

from benchmarks.timer import time_call
from data.builtin import PHOTO_NAMES
from tokenizer.quantizers import CodebookUsage, build_quantizer

# The built-in photos (data/builtin.py) less retina and the stereo pair, in the order docs/BENCHMARKS.md was measured
# with (hubble_deep_field last; the held-out split is a permutation of the concatenated patches, so order matters).
PHOTOS = sorted((n for n in PHOTO_NAMES if n not in ("retina", "stereo_motorcycle")),
                key=lambda n: n == "hubble_deep_field")


def patch_pool(patch: int = 8) -> torch.Tensor:
    """Every non-overlapping patch x patch crop of the photos: (P, 3*patch*patch) in [-1, 1]."""
    import skimage.data
    pools = []
    for name in PHOTOS:
        img = torch.from_numpy(np.ascontiguousarray(getattr(skimage.data, name)())).float() / 127.5 - 1  # (H, W, 3)
        h, w = (img.shape[0] // patch) * patch, (img.shape[1] // patch) * patch
        img = img[:h, :w].reshape(h // patch, patch, w // patch, patch, 3)  # (h', p, w', p, 3)
        pools.append(img.permute(0, 2, 4, 1, 3).reshape(-1, 3 * patch * patch))  # (h'*w', 3*p*p)
    return torch.cat(pools)


def fit(name: str, k: int, pool: torch.Tensor, held_out: torch.Tensor, steps: int, batch: int, dim: int,
        lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    enc, dec = nn.Linear(pool.shape[1], dim), nn.Linear(dim, pool.shape[1])
    q = build_quantizer(name, dim=dim, num_codes=k)
    params = [*enc.parameters(), *dec.parameters(), *q.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)

    def train() -> None:
        for _ in range(steps):
            x = pool[torch.randint(len(pool), (batch,), generator=g)]  # (B, 192)
            z = enc(x)[:, :, None]  # (B, D, 1): one token per patch
            out = q(z)
            loss = (dec(out.z_q[:, :, 0]) - x).pow(2).mean() + out.loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    seconds = time_call(train).best  # the whole fit, once
    q.eval()
    usage = CodebookUsage(k)
    with torch.no_grad():
        out = q(enc(held_out)[:, :, None])
        usage.update(out.codes)
        mse = (dec(out.z_q[:, :, 0]) - held_out).pow(2).mean().item()
    return {"quantizer": name, "K": k, "utilisation": usage.utilisation, "perplexity": usage.perplexity,
            "mse": mse, "seconds": seconds}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", default="1024,16384")
    ap.add_argument("--quantizers", default="simvq,vq,ema-vq")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    pool = patch_pool()
    perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed))
    held_out, train = pool[perm[:16384]], pool[perm[16384:]]
    print(f"command: python -m benchmarks.quantizer_fit {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{len(train):,} training patches, {len(held_out):,} held out; {args.steps} steps of {args.batch}, "
          f"D={args.dim}, Adam lr {args.lr}\n")
    print("| quantizer | K | utilisation | perplexity | held-out MSE | train time |\n|---|---|---|---|---|---|")
    rows = []
    for k in [int(v) for v in args.ks.split(",")]:
        for name in args.quantizers.split(","):
            r = fit(name, k, train, held_out, args.steps, args.batch, args.dim, args.lr, args.seed)
            rows.append(r)
            print(f"| {name} | {k:,} | {r['utilisation']:.1%} | {r['perplexity']:,.0f} | {r['mse']:.4f} | "
                  f"{r['seconds']:.0f} s |", flush=True)
    return rows


if __name__ == "__main__":
    main()
