"""SimVQ forward+backward: ours vs vector-quantize-pytorch's SimVQ vs the bare distance matmul; then a K sweep.

    python -m benchmarks.quantizer                      # K=65,536, D=128, N=4,096; sweep to K=1,048,576 at N=16,384
    python -m benchmarks.quantizer --device cuda --sweep-n 16384

Each measurement: median wall time over --repeats runs after a warm-up (benchmarks.timer), and peak memory of those
runs (CUDA: the allocator's peak above what was allocated before them; CPU: peak RSS growth of a fresh subprocess, so
one case cannot hide inside another's peak).
Prints a markdown table ready for docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from benchmarks.timer import time_call
from pipelines.device import resolve_device


def make_case(name: str, k: int, d: int, n: int, device: str):
    torch.manual_seed(0)
    z = torch.randn(n // 256, d, 16, 16, device=device, requires_grad=True)  # (B, D, H, W), N = B*H*W
    if name == "ours":
        from tokenizer.quantizers import build_quantizer
        q = build_quantizer("simvq", dim=d, num_codes=k).to(device)

        def step():
            out = q(z)
            (out.loss + out.z_q.square().mean()).backward()
        return step, [q.proj.weight]
    if name == "vqtorch":
        from vector_quantize_pytorch import SimVQ
        q = SimVQ(dim=d, codebook_size=k, rotation_trick=False, channel_first=True).to(device)

        def step():
            quantized, _, loss = q(z)
            (loss + quantized.square().mean()).backward()
        return step, list(q.parameters())
    if name == "matmul":  # the floor: the one (N, D) x (D, K) distance product any exact search must do
        w = torch.randn(k, d, device=device)
        flat = z.detach().movedim(1, -1).reshape(-1, d)

        def step():
            flat @ w.T
        return step, []
    raise ValueError(name)


def measure(name: str, k: int, d: int, n: int, device: str, repeats: int) -> dict:
    step, params = make_case(name, k, d, n, device)

    def clear_grads() -> None:
        for p in params:
            p.grad = None

    t = time_call(step, device, repeats=repeats, warmup=1, before=clear_grads)
    return {"case": name, "K": k, "D": d, "N": n, "median_s": t.median, "peak_bytes": t.added_bytes}


def measure_isolated(name, k, d, n, device, repeats) -> dict:
    """CPU: run in a fresh process and report its peak RSS over the idle process's, so cases don't share a peak."""
    if torch.device(device).type == "cuda":
        return measure(name, k, d, n, device, repeats)
    code = ("import json,resource,sys; from benchmarks.quantizer import measure;"
            "import torch; base=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss;"
            f"r=measure({name!r},{k},{d},{n},'cpu',{repeats});"
            "r['peak_bytes']=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss-base)*1024;"
            "print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        return {"case": name, "K": k, "D": d, "N": n, "median_s": float("nan"), "peak_bytes": None,
                "error": out.stderr.strip().splitlines()[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(r: dict) -> str:
    mem = "n/a" if r.get("peak_bytes") is None else f"{r['peak_bytes'] / 2**20:,.0f} MiB"
    err = f" ({r['error']})" if "error" in r else ""
    return f"| {r['case']} | {r['K']:,} | {r['N']:,} | {r['median_s'] * 1e3:,.1f} ms | {mem} |{err}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    ap.add_argument("--k", type=int, default=65536)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sweep-n", type=int, default=16384)
    ap.add_argument("--sweep-k", default="65536,262144,1048576")
    ap.add_argument("--sweep-repeats", type=int, default=1)
    args = ap.parse_args()
    args.device = str(resolve_device(args.device))
    cuda = args.device.startswith("cuda")
    print(f"command: python -m benchmarks.quantizer {' '.join(sys.argv[1:])}")
    print(f"device: {args.device} ({torch.cuda.get_device_name(args.device) if cuda else 'cpu'}), "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("\n| case | K | N | median fwd+bwd | peak memory |\n|---|---|---|---|---|")
    res = {c: measure_isolated(c, args.k, args.d, args.n, args.device, args.repeats)
           for c in ("ours", "vqtorch", "matmul")}
    for r in res.values():
        print(fmt(r), flush=True)
    ours, theirs, mm = res["ours"], res["vqtorch"], res["matmul"]
    print(f"\nours/vqtorch time {ours['median_s'] / theirs['median_s']:.2f}x (target <= 0.8x); "
          f"ours/matmul time {ours['median_s'] / mm['median_s']:.2f}x (target <= 1.3x)")
    if ours.get("peak_bytes") and theirs.get("peak_bytes"):
        print(f"ours/vqtorch peak memory {ours['peak_bytes'] / theirs['peak_bytes']:.2f}x (target <= 0.5x)")
    print("\nK sweep (ours):\n\n| case | K | N | median fwd+bwd | peak memory |\n|---|---|---|---|---|")
    for k in [int(x) for x in args.sweep_k.split(",") if x]:
        print(fmt(measure_isolated("ours", k, args.d, args.sweep_n, args.device, args.sweep_repeats)), flush=True)


if __name__ == "__main__":
    main()
