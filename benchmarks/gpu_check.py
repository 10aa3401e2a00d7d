"""One command for the GPU numbers of docs/BENCHMARKS.md, measured on the GPU it runs on, printed as one table.

    bash scripts/gpu_check                                  # = python -m benchmarks.gpu_check; < 8 min on one H200
    python -m benchmarks.gpu_check --device=cpu --tiny      # every code path at toy sizes (what the tests run)

Rows (paper sizes; --tiny shrinks every one):
  - train step: the stages' real bf16 steps (benchmarks.train_step): the paper-size tokenizer (`b`, 128 px,
    K = 65,536, G + D step, batch 32) in images/s, the GPT-B prior (L = 256, K = 65,536, batch 64) in tokens/s;
  - encode_shards: images/s of `pipelines.encode_shards` with that tokenizer (the checkpoint the train-step trainer
    saves) over synthetic 128 px photo crops, end to end (tokenizer load and PNG decoding included), after a warm-up
    run on the val split;
  - sampling: GPT-B (K = 16,384, 256 codes, top-k 100, bf16) at batch 16 and 256: no cache, kv cache, kv cache +
    CUDA graph, x-transformers' generate (benchmarks.sampling), codes/s and the ratios to no cache and to generate;
    then a check that the CUDA-graph path picks the eager cache's codes (fp32, greedy) and how far its logits are;
  - quantizer: SimVQ forward + backward at K = 262,144, N = 16,384, D = 128 (benchmarks.quantizer), time and peak
    CUDA memory.
A part that fails prints its error in its row and the command exits 1 after the table; without a CUDA device (and no
--device=cpu) it refuses with one line and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import io
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks import quantizer, sampling, train_step
from benchmarks.timer import time_call, time_rows


@dataclass(frozen=True)
class Sizes:
    tokenizer: str  # tokenizer size (tokenizer.nets)
    image: int  # pixels per side
    codes: int  # K of the tokenizer and the trained prior
    batch: int  # tokenizer train batch
    prior: str  # prior size (prior.PRIOR_SIZES), trained and sampled
    seq: int  # prior sequence length
    prior_batch: int
    encode_images: int  # synthetic images for encode_shards (about 90% land in train)
    sample_codes: int  # K of the sampled prior
    sample_batches: tuple[int, ...]
    top_k: int
    quant_k: int
    quant_n: int  # a multiple of 256 (benchmarks.quantizer lays N out as 16 x 16 grids)
    quant_d: int
    steps: int  # timed train steps (median)
    warmup: int


PAPER = Sizes(tokenizer="b", image=128, codes=65536, batch=32, prior="gpt-b", seq=256, prior_batch=64,
              encode_images=4096, sample_codes=16384, sample_batches=(16, 256), top_k=100, quant_k=262144,
              quant_n=16384, quant_d=128, steps=10, warmup=3)
TINY = Sizes(tokenizer="tiny", image=16, codes=1024, batch=8, prior="tiny", seq=16, prior_batch=8, encode_images=64,
             sample_codes=1024, sample_batches=(2, 4), top_k=100, quant_k=4096, quant_n=1024, quant_d=32, steps=2,
             warmup=1)


class Table:
    """Prints the header at once and each row as it is measured (a timeout still leaves the finished rows)."""

    def __init__(self) -> None:
        self.failed = 0
        print("| part | setting | result | detail |\n|---|---|---|---|", flush=True)

    def row(self, part: str, setting: str, result: str, detail: str = "") -> None:
        print(f"| {part} | {setting} | {result} | {detail} |", flush=True)

    @contextlib.contextmanager
    def part(self, part: str, setting: str):
        """Runs a part; an exception becomes an error row (and exit status 1), and the next part still runs."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - reported in the table, the command exits 1
            self.failed += 1
            message = " ".join(str(e).split())[:300]
            self.row(part, setting, "**error**", f"{type(e).__name__}: {message}")


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.1f} GiB"


def quiet():
    """The stages' own progress lines would break the table."""
    return contextlib.redirect_stdout(io.StringIO())


def release(device: torch.device) -> None:
    """Free what the previous part left (its models, optimisers, cache), so that each part's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_case(table: Table, setting: str, make_case, items: int, unit: str, s: Sizes, device: torch.device):
    """One train-step row: build the case quietly, time its step, write `items / step time` in `unit`; the case."""
    with table.part("train step", setting):
        with quiet():
            case = make_case()
        t = time_call(case.step, device, repeats=s.steps, warmup=s.warmup)
        table.row("train step", setting, f"{items / t.median:,.0f} {unit}",
                  f"{case.params / 1e6:.1f}M params, {t.median * 1e3:.0f} ms/step, peak memory {gib(t.peak_bytes)}")
        return case


def train_rows(table: Table, s: Sizes, device: torch.device, tmp: Path) -> Path | None:
    """The two stages' train steps; returns the tokenizer run directory with a saved checkpoint (for encode)."""
    args = SimpleNamespace(batch=s.batch, tokenizer_size=s.tokenizer, codes=s.codes, image=s.image,
                           prior_batch=s.prior_batch, prior_size=s.prior, seq=s.seq)
    tok_run = None
    case = time_case(table, f"tokenizer {s.tokenizer}, {s.image} px, K={s.codes:,}, G+D step, batch {s.batch}",
                     lambda: train_step.tokenizer_case(args, device, tmp / "tokenizer"), s.batch, "images/s", s,
                     device)
    if case is not None:
        with table.part("train step", "saving the tokenizer checkpoint (for encode_shards)"):
            case.trainer.save()
            tok_run = tmp / "tokenizer"
    case = None
    release(device)
    time_case(table, f"prior {s.prior}, L={s.seq}, K={s.codes:,}, batch {s.prior_batch}",
              lambda: train_step.prior_case(args, device, tmp / "prior"), s.prior_batch * s.seq, "tokens/s", s, device)
    release(device)
    return tok_run


def encode_row(table: Table, s: Sizes, device: torch.device, tmp: Path, tokenizer: Path | None) -> None:
    from data.builtin import photos
    from data.media import MediaSpec
    from data.shards import write_media_shards
    from pipelines import encode_shards
    from pipelines.config import parse_config

    setting = f"tokenizer {s.tokenizer}, {s.image} px photo crops, batch 256"
    with table.part("encode_shards", setting):
        if tokenizer is None:
            raise RuntimeError("no tokenizer checkpoint: the tokenizer train-step row failed")
        shards = tmp / "shards"
        media = write_media_shards(photos(s.image, s.encode_images), shards, MediaSpec(modality="image", size=s.image),
                                   log=lambda *a: None)

        def encode(out: str, split: str) -> None:
            cfg = parse_config(encode_shards.EncodeShardsConfig, [
                f"--data={shards}", f"--tokenizer={tokenizer}", f"--out={tmp / out}", f"--splits={split}",
                f"--device={device}", "--batch_size=256"])
            with quiet():
                encode_shards.main(cfg)

        encode("tokens-warmup", "val")
        t = time_call(lambda: encode("tokens", "train"), device)
        n = media.counts["train"]
        table.row("encode_shards", setting, f"{n / t.median:,.0f} images/s",
                  f"{n:,} train images in {t.median:.1f} s, end to end (tokenizer load, PNG decode)")


def sampling_rows(table: Table, s: Sizes, device: torch.device) -> None:
    from prior import PriorConfig, SampleSettings, build_prior, decode

    torch.manual_seed(0)
    prior = build_prior(PriorConfig(size=s.prior, num_codes=s.sample_codes, seq_len=s.seq, num_classes=1000))
    prior = prior.to(device).eval()
    precision = "bf16" if device.type == "cuda" else "fp32"
    for batch in s.sample_batches:
        base = f"{s.prior}, K={s.sample_codes:,}, {s.seq} codes, batch {batch}, top-k {s.top_k}, {precision}"
        with table.part("sampling", base):
            rows = sampling.decoders(prior, batch, s.seq, s.top_k)
            seconds = {name: t.best for name, t in time_rows(rows, device, repeats=1, warmup=1).items()}
            for name, secs in seconds.items():
                table.row("sampling", f"{base}: {name}", f"{batch * s.seq / secs:,.0f} codes/s",
                          f"{seconds[sampling.NO_CACHE] / secs:.1f}x no cache, {seconds[sampling.XT] / secs:.1f}x "
                          f"generate, {secs:.2f} s")
    batch = s.sample_batches[0]
    setting = f"CUDA-graph path vs eager kv cache: {s.prior}, batch {batch}, greedy, fp32"
    with table.part("sampling check", setting):
        labels, seeds = torch.arange(batch, device=device), list(range(batch))
        eager, graph = (decode(prior, labels, s.seq, SampleSettings(temperature=0.0, cuda_graph=g), seeds,
                               keep_logits=True) for g in (False, True))
        equal = eager.codes == graph.codes  # (B, L)
        # position i's logits see codes < i: compare them where those agree (a greedy path diverges after a flip)
        same_prefix = torch.cat([torch.ones_like(equal[:, :1]), equal[:, :-1].cumprod(dim=1)], dim=1)
        diff = (eager.logits - graph.logits).abs().amax(dim=-1)[same_prefix.bool()].max().item()
        table.row("sampling check", setting, f"{equal.float().mean().item():.1%} of codes equal",
                  f"max abs logit difference {diff:.2g} (positions whose earlier codes agree)")
    prior = eager = graph = None
    release(device)


def quantizer_row(table: Table, s: Sizes, device: torch.device) -> None:
    setting = f"SimVQ fwd+bwd, K={s.quant_k:,}, N={s.quant_n:,}, D={s.quant_d}, fp32"
    with table.part("quantizer", setting):
        r = quantizer.measure("ours", s.quant_k, s.quant_d, s.quant_n, str(device), repeats=3)
        memory = "n/a (CPU)" if r["peak_bytes"] is None else f"{gib(r['peak_bytes'])} above start"
        table.row("quantizer", setting, f"{r['median_s'] * 1e3:,.1f} ms", f"peak memory {memory}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (cpu: only with --tiny makes sense)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: a smoke run of every code path")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__} sees none); run it on a GPU machine, or "
              f"`python -m benchmarks.gpu_check --device=cpu --tiny` for the CPU smoke run", file=sys.stderr)
        return 2
    sizes = TINY if args.tiny else PAPER
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {name}, torch {torch.__version__}, {'tiny' if args.tiny else 'paper'} sizes, "
          f"{time.strftime('%Y-%m-%d %H:%M')}\n", flush=True)
    start = time.perf_counter()
    table = Table()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_rows(table, sizes, device, Path(tmp))
        encode_row(table, sizes, device, Path(tmp), tokenizer)
    sampling_rows(table, sizes, device)
    quantizer_row(table, sizes, device)
    print(f"\n{time.perf_counter() - start:.0f} s in all" + (f"; {table.failed} part(s) failed" if table.failed else ""))
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
