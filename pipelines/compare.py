"""Judge tokenizers by the generation quality of the priors trained on them: the tokenizer-impact report.

    python -m pipelines.compare --data=runs/digits/shards --out=runs/compare \\
        --presets=simvq-1024,simvq-8192,simvq-65536,vq-8192 --config=configs/compare_digits.toml

For each preset `<quantizer>-<K>` it runs train_tokenizer -> encode_shards -> train_prior -> sample -> evaluate
into `<out>/<preset>/`, then writes `<out>/report.md` with one table (utilisation, PSNR, SSIM, rFID, gFID, KID,
precision/recall, prior loss, wall time per stage), plots against K and the reconstruction and sample grids side by
side. Per-stage settings come from the TOML tables [tokenizer], [encode], [prior], [sample], [evaluate] (any key the
stage takes, nested tables for nested sections), shared by every preset.

Finished stages are reused: each stage leaves `<stage>.done.json` with the exact arguments it ran with; a rerun
skips it when they are unchanged, resumes an interrupted training run, and refuses when they changed (delete the
stage directory or pick another --out).
"""
from __future__ import annotations

import dataclasses
import json
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from data.shards import write_text_atomic
from pipelines import encode_shards, evaluate, sample, train_prior, train_tokenizer
from pipelines.config import parse_config
from tokenizer.quantizers import QUANTIZERS


@dataclass
class CompareConfig:
    data: str = "runs/digits/shards"  # labelled media shards (python -m pipelines.make_shards)
    out: str = "runs/compare"  # one sub-directory per preset, plus report.md and plots
    presets: str = "simvq-1024,simvq-8192,simvq-65536,vq-8192"  # comma list of <quantizer>-<K>
    title: str = "Tokenizer impact report"  # report heading
    tokenizer: dict[str, Any] = field(default_factory=dict)  # overrides for pipelines.train_tokenizer
    encode: dict[str, Any] = field(default_factory=dict)  # overrides for pipelines.encode_shards
    prior: dict[str, Any] = field(default_factory=dict)  # overrides for pipelines.train_prior
    sample: dict[str, Any] = field(default_factory=dict)  # overrides for pipelines.sample
    evaluate: dict[str, Any] = field(default_factory=dict)  # overrides for pipelines.evaluate


def to_argv(overrides: dict[str, Any], cls: type, prefix: str = "") -> list[str]:
    """Stage overrides -> that stage's `--key=value` arguments, for the stage config class `cls`:
    {"loop": {"steps": 5}, "losses": {"weights": {"recon/l1": 1}}} -> ["--loop.steps=5",
    '--losses.weights={"recon/l1": 1}']. Tables of nested sections become dotted keys; a dict-typed field's table
    travels whole as JSON, so it replaces the stage's default dict exactly as the TOML table says."""
    hints = typing.get_type_hints(cls)
    argv = []
    for k, v in overrides.items():
        tp = hints.get(k)
        if isinstance(v, dict) and tp is not None and dataclasses.is_dataclass(tp):
            argv += to_argv(v, tp, f"{prefix}{k}.")
        elif isinstance(v, (dict, list, tuple, bool)) or v is None:
            argv.append(f"--{prefix}{k}={json.dumps(v)}")
        else:
            argv.append(f"--{prefix}{k}={v}")
    return argv


STAGE_CONFIGS = {"tokenizer": train_tokenizer.TrainTokenizerConfig, "encode": encode_shards.EncodeShardsConfig,
                 "prior": train_prior.TrainPriorConfig, "sample": sample.SampleConfig,
                 "evaluate": evaluate.EvaluateConfig}


def stage_argv(cfg: CompareConfig, stage: str) -> list[str]:
    """The [stage] table of the compare config as that stage's arguments."""
    return to_argv(getattr(cfg, stage), STAGE_CONFIGS[stage])


def parse_preset(name: str) -> tuple[str, int]:
    quantizer, _, k = name.rpartition("-")
    if quantizer not in QUANTIZERS or not k.isdigit():
        raise ValueError(f"preset {name!r} is not <quantizer>-<K> with a quantizer in {sorted(QUANTIZERS)}")
    return quantizer, int(k)


def run_stage(name: str, stage_dir: Path, fn: Callable[[list[str]], Any], argv: list[str],
              resumable: bool) -> tuple[Any, float]:
    """Run (or reuse) one stage; returns (its result, wall seconds of the run that made it)."""
    done = stage_dir.with_name(stage_dir.name + ".done.json")
    if done.is_file():
        record = json.loads(done.read_text())
        if record["argv"] == argv:
            print(f"[compare] {stage_dir}: done, reused")
            return record["result"], record["seconds"]
        raise RuntimeError(f"{stage_dir} was made with other settings ({done}); delete {stage_dir} and {done} "
                           f"to redo it, or use another --out")
    run_argv = argv + (["--loop.resume=true"] if resumable and (stage_dir / "checkpoints").is_dir() else [])
    print(f"[compare] {name}: {' '.join(run_argv)}", flush=True)
    t0 = time.perf_counter()
    result = fn(run_argv)
    seconds = time.perf_counter() - t0
    if dataclasses.is_dataclass(result):
        result = dataclasses.asdict(result)
    result = json.loads(json.dumps(result, default=str))
    write_text_atomic(done, json.dumps({"argv": argv, "result": result, "seconds": seconds}, indent=2))
    return result, seconds


def run_preset(cfg: CompareConfig, preset: str) -> dict[str, Any]:
    quantizer, k = parse_preset(preset)
    root = Path(cfg.out) / preset
    tok_dir, tokens_dir, prior_dir = root / "tokenizer", root / "tokens", root / "prior"
    samples_dir, eval_dir = root / "samples", root / "eval"
    row: dict[str, Any] = {"preset": preset, "quantizer": quantizer, "K": k, "seconds": {}}

    argv = [f"--data={cfg.data}", f"--out={tok_dir}", f"--model.quantizer={quantizer}", f"--model.num_codes={k}"]
    _, row["seconds"]["tokenizer"] = run_stage("train_tokenizer", tok_dir, train_tokenizer.main,
                                               argv + stage_argv(cfg, "tokenizer"), resumable=True)
    argv = [f"--data={cfg.data}", f"--tokenizer={tok_dir}", f"--out={tokens_dir}"]
    _, row["seconds"]["encode"] = run_stage("encode_shards", tokens_dir, encode_shards.main,
                                            argv + stage_argv(cfg, "encode"), resumable=False)
    argv = [f"--tokens={tokens_dir}", f"--out={prior_dir}"]
    prior_result, row["seconds"]["prior"] = run_stage("train_prior", prior_dir, train_prior.main,
                                                      argv + stage_argv(cfg, "prior"), resumable=True)
    argv = [f"--prior={prior_dir}", f"--tokenizer={tok_dir}", f"--out={samples_dir}"]
    _, row["seconds"]["sample"] = run_stage("sample", samples_dir, sample.main, argv + stage_argv(cfg, "sample"),
                                            resumable=False)
    argv = [f"--data={cfg.data}", f"--tokenizer={tok_dir}", f"--samples={samples_dir}", f"--out={eval_dir}"]
    metrics, row["seconds"]["evaluate"] = run_stage("evaluate", eval_dir, evaluate.main,
                                                    argv + stage_argv(cfg, "evaluate"), resumable=False)
    row["metrics"] = {**metrics, **{f"prior/{k2}": v for k2, v in (prior_result or {}).items()
                                    if k2.startswith("val/")}}
    row["grids"] = {"recon": str((eval_dir / "recon.png").relative_to(cfg.out)),
                    "samples": str((samples_dir / "grid.png").relative_to(cfg.out))}
    return row


COLUMNS = [  # (header, metric key, format) of the headline table; every metric is in the full table below it
    # Utilisation next to the token count it was counted on (K is the column before): below K tokens it cannot
    # reach 100%, so a val-split number alone would measure the split's size.
    ("train tokens", "usage/tokens", "{:,.0f}"), ("util. (train)", "usage/utilisation", "{:.1%}"),
    ("perplexity (train)", "usage/perplexity", "{:,.0f}"),
    ("val tokens", "recon/tokens", "{:,.0f}"), ("util. (val)", "recon/utilisation", "{:.1%}"),
    ("PSNR", "recon/psnr", "{:.2f}"), ("SSIM", "recon/ssim", "{:.3f}"),
]


def fmt(v: Any, spec: str = "{:.4g}") -> str:
    return "–" if v is None else spec.format(v)


def extractor_tags(rows: list[dict]) -> list[str]:
    return sorted({k.split("fid_", 1)[1] for r in rows for k in r["metrics"] if k.split("/")[-1].startswith("fid_")})


def write_report(cfg: CompareConfig, rows: list[dict]) -> Path:
    out = Path(cfg.out)
    tags = extractor_tags(rows)
    headline = list(COLUMNS)
    for t in tags:
        headline += [(f"rFID {t}", f"recon/fid_{t}", "{:.3g}"), (f"gFID {t}", f"gen/fid_{t}", "{:.3g}"),
                     (f"gKID {t}", f"gen/kid_{t}", "{:.3g}"), (f"precision {t}", f"gen/precision_{t}", "{:.2f}"),
                     (f"recall {t}", f"gen/recall_{t}", "{:.2f}")]
    headline += [("class acc.", f"gen/class_accuracy_{t}", "{:.1%}") for t in tags
                 if any(f"gen/class_accuracy_{t}" in r["metrics"] for r in rows)]
    headline += [("prior val loss", "prior/val/loss", "{:.3f}")]
    headers = ["preset", "K"] + [h for h, _, _ in headline] + ["wall time"]
    lines = [f"# {cfg.title}", "",
             f"Data: `{cfg.data}`. Every number below was computed by `python -m pipelines.compare` in this run. "
             "FIDs name their feature extractor (`digits`: a classifier trained on the dataset's labelled train "
             "split; `inception`: torch-fidelity's Inception). rFID compares the val images with their "
             "reconstructions, gFID/gKID/precision/recall the generated samples with the train split; "
             "`<gen|recon>/n_<tag>` and `n_reference_<tag>` in the full table say how many images each side had. "
             "Utilisation is the share of the K codes used at least once in `tokens` tokens (train: every train "
             "image encoded once; val: the val split): with fewer tokens than K it cannot reach 100%.", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        m = r["metrics"]
        cells = [r["preset"], f"{r['K']:,}"] + [fmt(m.get(key), spec) for _, key, spec in headline]
        cells.append(f"{sum(r['seconds'].values()):.0f} s")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Wall time per stage (s): " + "; ".join(
        f"{r['preset']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()) for r in rows), ""]
    plot = plot_against_k(rows, out)
    if plot:
        lines += [f"![metrics vs K]({plot.name})", ""]
    lines += ["## Reconstructions (val: originals above, reconstructions below) and samples (one row per class)", "",
              "| preset | reconstructions | samples |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | ![]({r['grids']['recon']}) | ![]({r['grids']['samples']}) |")
    keys = sorted({k for r in rows for k in r["metrics"]})
    lines += ["", "## All metrics", "", "| metric | " + " | ".join(r["preset"] for r in rows) + " |",
              "|---|" + "---|" * len(rows)]
    lines += [f"| {k} | " + " | ".join(fmt(r["metrics"].get(k)) for r in rows) + " |" for k in keys]
    report = out / "report.md"
    write_text_atomic(report, "\n".join(lines) + "\n")
    write_text_atomic(out / "report.json", json.dumps(rows, indent=2))
    return report


def plot_against_k(rows: list[dict], out: Path) -> Path | None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(k, label) for k, label in (("usage/utilisation", "utilisation (train split)"),
                                          ("recon/utilisation", "utilisation (val split)"))
              if any(k in r["metrics"] for r in rows)]
    panels += [(k, k) for k in sorted({k for r in rows for k in r["metrics"]}) if k.split("/")[-1].startswith("fid_")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for q in sorted({r["quantizer"] for r in rows}):
            pts = sorted((r["K"], r["metrics"][key]) for r in rows if r["quantizer"] == q and key in r["metrics"])
            if pts:
                ax.plot(*zip(*pts), marker="o", label=q)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("codebook size K")
        ax.set_title(label)
        ax.legend()
    fig.tight_layout()
    path = out / "metrics_vs_k.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None, base: dict | None = None) -> Path:
    cfg = parse_config(CompareConfig, argv, base)
    presets = [p.strip() for p in cfg.presets.split(",") if p.strip()]
    for p in presets:
        parse_preset(p)  # fail before hours of training, not after
    rows = [run_preset(cfg, p) for p in presets]
    report = write_report(cfg, rows)
    print(f"[compare] report: {report}")
    return report


if __name__ == "__main__":
    main()
