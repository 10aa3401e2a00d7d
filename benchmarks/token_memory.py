"""Memory of P training processes reading one token split: each process holding the split (`load_tokens`, what every
rank did before) vs the memory-mapped cache (`open_tokens`, what `train_prior` reads).

Run from the repository root:

    python -m benchmarks.token_memory --samples 200000 --seq-len 256 --processes 4

It writes a token directory of `--samples` random rows of `--seq-len` uint16 codes (K = 16,384) under `--root`,
then starts `--processes` fresh Python processes per reader at once; each opens the split, walks one shuffled epoch
of `TokenLoader` batches (rank r of P, as under a launcher) and reports, from /proc/self/smaps_rollup, its private
memory (Private_Clean + Private_Dirty: what no other process shares) and its proportional share of the rest (Pss)
above what it held before opening the split. Linux only.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

try:
    from data.shards import shard_name
    from data.tokens import TokenManifest, TokenSample, write_token_shard
except ModuleNotFoundError as err:  # run as a file, the repository root is not on sys.path
    raise SystemExit(f"{err}: run this from the repository root as `python -m benchmarks.token_memory`") from err

NUM_CODES = 16_384
PER_SHARD = 10_000

WORKER = """
import json, sys, time
from benchmarks.token_memory import memory
from data.tokens import TokenLoader, load_tokens, open_tokens
reader, directory, rank, world = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
before = memory()
t0 = time.perf_counter()
tokens = load_tokens(directory, "train") if reader == "in memory" else open_tokens(directory, "train")
rows = 0
for batch in TokenLoader(tokens, batch_size=256, shuffle=True, seed=0, rank=rank, world_size=world):
    rows += len(batch.tokens)
after = memory()
print(json.dumps({"rows": rows, "seconds": time.perf_counter() - t0,
                  **{k: after[k] - before[k] for k in after}}))
"""


def memory() -> dict[str, int]:
    """{"private", "pss"} bytes of this process (Linux /proc/self/smaps_rollup)."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            fields[name] = int(rest.split()[0]) * 1024
    return {"private": fields["Private_Clean"] + fields["Private_Dirty"], "pss": fields["Pss"]}


def make_tokens(directory: Path, samples: int, seq_len: int, seed: int = 0) -> None:
    """A token directory of random uint16 codes (a fake tokenizer identity: only the reading is measured)."""
    if (directory / "manifest.json").is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for index, start in enumerate(range(0, samples, PER_SHARD)):
        count = min(PER_SHARD, samples - start)
        codes = rng.integers(0, NUM_CODES, size=(count, seq_len), dtype=np.uint16)
        labels = rng.integers(0, 1000, size=count)
        names.append(shard_name("train", index))
        write_token_shard(directory / names[-1], (TokenSample(f"s{start + i:08d}", codes[i], int(labels[i]))
                                                  for i in range(count)), NUM_CODES, grid=(seq_len,))
    TokenManifest(tokenizer_sha256="0" * 64, quantizer="benchmark", num_codes=NUM_CODES, grid=[seq_len],
                  counts={"train": samples, "val": 0}, class_names=[], source_manifest_sha256="0" * 64,
                  shards={"train": len(names), "val": 0}, shard_names={"train": names, "val": []}).save(directory)


def run(reader: str, directory: Path, processes: int) -> list[dict]:
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, reader, str(directory), str(r), str(processes)],
                              stdout=subprocess.PIPE, text=True) for r in range(processes)]
    out = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a {reader!r} process failed")
    return [json.loads(o.strip().splitlines()[-1]) for o in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--root", default="runs/bench/token_memory")
    args = parser.parse_args()
    directory = Path(args.root) / f"tokens-{args.samples}x{args.seq_len}"
    t0 = time.perf_counter()
    make_tokens(directory, args.samples, args.seq_len)
    print(f"# python -m benchmarks.token_memory {shlex.join(sys.argv[1:])}")
    print(f"token split: {args.samples:,} x {args.seq_len} uint16 = {args.samples * args.seq_len * 2 / 2**20:.0f} MiB "
          f"of codes ({time.perf_counter() - t0:.0f} s to write or find)")
    open_once = run("memory-mapped", directory, 1)  # builds the cache once, so the timed rows below only read it
    print(f"cache build (first open, one process): {open_once[0]['seconds']:.1f} s")
    print(f"| reader | processes | private MiB per process | Pss MiB per process | total Pss MiB | open + epoch s |")
    print("|---|---|---|---|---|---|")
    for reader in ("in memory", "memory-mapped"):
        rows = run(reader, directory, args.processes)
        mib = lambda key: [r[key] / 2**20 for r in rows]  # noqa: E731
        print(f"| {reader} | {args.processes} | {max(mib('private')):.0f} | {max(mib('pss')):.0f} | "
              f"{sum(mib('pss')):.0f} | {max(r['seconds'] for r in rows):.1f} |")


if __name__ == "__main__":
    main()
