"""Judge tokenizers by the generation quality of the priors trained on them: the tokenizer-impact report.

    python -m pipelines.compare --data=runs/digits/shards --out=runs/compare \\
        --presets=simvq-1024,simvq-8192,simvq-65536,vq-8192 --config=configs/compare_digits.toml

For each preset `<quantizer>-<K>` it runs train_tokenizer -> encode_shards -> train_prior -> sample -> evaluate
into `<out>/<preset>/`, then writes `<out>/report.md` with one table (utilisation, PSNR, SSIM, rFID, gFID, KID,
precision/recall, prior loss, wall time per stage), plots against K and the reconstruction and sample grids side by
side. Per-stage settings come from the TOML tables [tokenizer], [encode], [prior], [sample], [evaluate] (any key the
stage takes, nested tables for nested sections), shared by every preset: each becomes that stage's config dataclass
(`stage_config`) and the stage runs as `stage.main(cfg)`.

A tokenizer trained elsewhere joins as one more row: `--tokenizers='{"paper-1k": "runs/official/simvq-1k"}'` (or a
[tokenizers] TOML table) names existing tokenizer checkpoints, e.g. the paper's released ones converted by
`pipelines.import_official`; their rows skip train_tokenizer and run the other four stages on `data` like every preset,
so the table compares the generators trained on each tokenizer's codes. Their wall time excludes tokenizer training.

Audio: the tokenizers train on `tokenizer_data` (e.g. spoken-digit strings of 2-4 s, long enough for PESQ, STOI and
ViSQOL) and are scored there by `reconstruct` on whole val clips; the prior trains on `data` (the labelled 1-s
spoken digits) and its samples are judged by the log-mel digit classifier. `--codecs=opus-6,codec2-1200` adds
classical codec rows (pipelines.codec_baseline) measured on the same clips with the same metrics.

Finished stages are reused: each stage leaves `<stage>.done.json` with the exact config it ran with; a rerun skips
it when that config is unchanged, resumes an interrupted training run, and refuses when it changed (delete the stage
directory or pick another --out).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.errors import UserError
from data.files import write_text_atomic
from pipelines import codec_baseline, encode_shards, evaluate, reconstruct, sample, train_prior, train_tokenizer
from pipelines.checkpoint import load_config, resolve_checkpoint
from pipelines.cli import run
from pipelines.config import ConfigError, from_dict, merge_config, required, to_dict
from tokenizer.quantizers import QUANTIZERS


@dataclass
class CompareConfig:
    data: str = required()  # labelled media shards (python -m pipelines.make_shards)
    out: str = "runs/compare"  # one sub-directory per preset, plus report.md and plots
    presets: tuple[str, ...] = ("simvq-1024", "simvq-8192", "simvq-65536", "vq-8192")  # <quantizer>-<K> each
    tokenizer_data: str = ""  # media shards the tokenizers train and are reconstructed on; "" = data
    codecs: tuple[str, ...] = ()  # audio: classical codec rows, <codec>-<bitrate>: opus-6 (kbit/s), codec2-1200 (bit/s)
    title: str = "Tokenizer impact report"  # report heading
    # Extra rows: name -> an existing tokenizer checkpoint (e.g. pipelines.import_official's output), not trained here
    tokenizers: dict[str, str] = field(default_factory=dict)
    tokenizer: dict[str, Any] = field(default_factory=dict)  # overrides for pipelines.train_tokenizer
    encode: dict[str, Any] = field(default_factory=dict)  # overrides for pipelines.encode_shards
    prior: dict[str, Any] = field(default_factory=dict)  # overrides for pipelines.train_prior
    sample: dict[str, Any] = field(default_factory=dict)  # overrides for pipelines.sample
    evaluate: dict[str, Any] = field(default_factory=dict)  # overrides for pipelines.evaluate
    reconstruct: dict[str, Any] = field(default_factory=dict)  # overrides for pipelines.reconstruct (tokenizer_data)
    codec: dict[str, Any] = field(default_factory=dict)  # overrides for pipelines.codec_baseline


class StageChanged(UserError, RuntimeError):
    """A finished stage directory made with other settings than this run asks for."""


STAGES = {"tokenizer": (train_tokenizer, train_tokenizer.TrainTokenizerConfig),
          "encode": (encode_shards, encode_shards.EncodeShardsConfig),
          "prior": (train_prior, train_prior.TrainPriorConfig),
          "sample": (sample, sample.SampleConfig),
          "evaluate": (evaluate, evaluate.EvaluateConfig),
          "reconstruct": (reconstruct, reconstruct.ReconstructConfig),
          "codec": (codec_baseline, codec_baseline.CodecBaselineConfig)}


def stage_config(cfg: CompareConfig, stage: str, **fixed: Any) -> Any:
    """The stage's config dataclass: `fixed` (paths, the preset's quantizer and K; nested sections as dicts) with the
    compare config's [stage] table on top, merged as a TOML file would be (a partial section keeps the stage's other
    defaults; a dict-typed setting such as losses.weights is replaced whole)."""
    cls = STAGES[stage][1]
    return from_dict(cls, merge_config(cls, fixed, getattr(cfg, stage)))


def parse_preset(name: str) -> tuple[str, int]:
    quantizer, _, k = name.rpartition("-")
    if quantizer not in QUANTIZERS or not k.isdigit():
        raise ConfigError(f"--presets: {name!r} is not <quantizer>-<K> with a quantizer in {sorted(QUANTIZERS)}")
    return quantizer, int(k)


def run_stage(stage: str, stage_dir: Path, stage_cfg: Any) -> tuple[Any, float]:
    """Run (or reuse) one stage; returns (its result, wall seconds of the run that made it)."""
    done = stage_dir.with_name(stage_dir.name + ".done.json")
    config = to_dict(stage_cfg)
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("config") == config:
            print(f"[compare] {stage_dir}: done, reused")
            return record["result"], record["seconds"]
        raise StageChanged(f"{stage_dir} was made with other settings ({done}); delete {stage_dir} and {done} "
                           f"to redo it, or use another --out")
    if hasattr(stage_cfg, "loop") and (stage_dir / "checkpoints").is_dir():  # an interrupted training run
        stage_cfg = dataclasses.replace(stage_cfg, loop=dataclasses.replace(stage_cfg.loop, resume=True))
    module = STAGES[stage][0]
    print(f"[compare] {module.__name__} -> {stage_dir}: {json.dumps(config)}", flush=True)
    t0 = time.perf_counter()
    result = module.main(stage_cfg)
    seconds = time.perf_counter() - t0
    if dataclasses.is_dataclass(result):
        result = dataclasses.asdict(result)
    result = json.loads(json.dumps(result, default=str))
    write_text_atomic(done, json.dumps({"config": config, "result": result, "seconds": seconds}, indent=2))
    return result, seconds


def run_preset(cfg: CompareConfig, preset: str) -> dict[str, Any]:
    given = cfg.tokenizers.get(preset)
    root = Path(cfg.out) / preset
    if given:  # an existing tokenizer: its row skips tokenizer training
        tok_dir = resolve_checkpoint(given, hint="convert one with `python -m pipelines.import_official`")
        tok = load_config(tok_dir)["config"]
        quantizer, k = tok["quantizer"], tok["num_codes"]
    else:
        tok_dir = root / "tokenizer"
        quantizer, k = parse_preset(preset)
    tokens_dir, prior_dir, samples_dir, eval_dir = root / "tokens", root / "prior", root / "samples", root / "eval"
    tok_data = cfg.tokenizer_data or cfg.data
    stages = {  # stage -> (its directory, the settings compare decides)
        "tokenizer": (tok_dir, dict(data=tok_data, out=str(tok_dir), model={"quantizer": quantizer, "num_codes": k})),
        "encode": (tokens_dir, dict(data=cfg.data, tokenizer=str(tok_dir), out=str(tokens_dir))),
        "prior": (prior_dir, dict(tokens=str(tokens_dir), out=str(prior_dir))),
        "sample": (samples_dir, dict(prior=str(prior_dir), tokenizer=str(tok_dir), out=str(samples_dir))),
        # with tokenizer_data, reconstruction runs there (below) and evaluate judges the samples only
        "evaluate": (eval_dir, dict(data=cfg.data, tokenizer="" if cfg.tokenizer_data else str(tok_dir),
                                    samples=str(samples_dir), out=str(eval_dir))),
    }
    if given:
        del stages["tokenizer"]
    if cfg.tokenizer_data:
        stages["reconstruct"] = (root / "recon", dict(data=tok_data, tokenizer=str(tok_dir), out=str(root / "recon")))
    row: dict[str, Any] = {"preset": preset, "quantizer": quantizer, "K": k, "seconds": {},
                           "tokenizer": str(tok_dir) if given else None}
    results = {}
    for stage, (directory, fixed) in stages.items():
        results[stage], row["seconds"][stage] = run_stage(stage, directory, stage_config(cfg, stage, **fixed))
    recon = {key.replace("val/", "recon/", 1): v for key, v in results.get("reconstruct", {}).items()}
    row["metrics"] = {**recon, **results["evaluate"], **{f"prior/{k2}": v for k2, v in (results["prior"] or {}).items()
                                                         if k2.startswith("val/")}}
    recon_dir = root / "recon" if cfg.tokenizer_data else eval_dir
    row["grids"] = {"recon": str((recon_dir / "recon.png").relative_to(cfg.out)),
                    "samples": str((samples_dir / "grid.png").relative_to(cfg.out))}
    return row


def run_codec(cfg: CompareConfig, name: str) -> dict[str, Any]:
    """A classical codec's row: its reconstruction metrics on the tokenizers' val clips (no prior, no samples)."""
    codec, bitrate = codec_baseline.parse_codec(name)
    directory = Path(cfg.out) / name
    fixed = dict(data=cfg.tokenizer_data or cfg.data, out=str(directory), codec=codec, bitrate=bitrate)
    result, seconds = run_stage("codec", directory, stage_config(cfg, "codec", **fixed))
    return {"preset": name, "quantizer": codec, "K": None, "seconds": {"codec": seconds}, "tokenizer": None,
            "codec": True, "metrics": result, "grids": {}}


COLUMNS = [  # (header, metric key, format) of the headline table; every metric is in the full table below it
    # Utilisation next to the token count it was counted on (K is the column before): below K tokens it cannot
    # reach 100%, so a val-split number alone would measure the split's size.
    ("train tokens", "usage/tokens", "{:,.0f}"), ("util. (train)", "usage/utilisation", "{:.1%}"),
    ("perplexity (train)", "usage/perplexity", "{:,.0f}"),
    ("val tokens", "recon/tokens", "{:,.0f}"), ("util. (val)", "recon/utilisation", "{:.1%}"),
    ("PSNR", "recon/psnr", "{:.2f}"), ("SSIM", "recon/ssim", "{:.3f}"),
]


IMAGE_INTRO = ("FIDs name their feature extractor (`digits`: a classifier trained on the dataset's labelled train "
               "split; `inception`: torch-fidelity's Inception). rFID compares the val images with their "
               "reconstructions, gFID/gKID/precision/recall the generated samples with the train split; "
               "`<gen|recon>/n_<tag>` and `n_reference_<tag>` in the full table say how many images each side had. "
               "Utilisation is the share of the K codes used at least once in `tokens` tokens (train: every train "
               "image encoded once; val: the val split): with fewer tokens than K it cannot reach 100%.")
AUDIO_INTRO = ("Reconstruction (kbps … SI-SDR) is measured on whole val clips of `{tokenizer_data}`, the same clips "
               "for every row, codec rows included; PESQ-wb, STOI, ViSQOL and V/UV F1 leave out (and count, in "
               "`recon/<metric>_failures`) the clips they cannot score. The generated 1-s digits are judged by a "
               "log-mel classifier trained on the train split of the data above: class accuracy, Fréchet distance "
               "(FD) on its features and an Inception-style score (IS). kbps = tokens/s x log2 K. Utilisation is "
               "the share of the K codes used at least once over `tokens` tokens.")

AUDIO_COLUMNS = [  # the audio rows' reconstruction headline (whole val clips), after the utilisation columns
    ("kbps", "recon/bitrate_kbps", "{:.2f}"), ("PESQ", "recon/pesq", "{:.2f}"), ("STOI", "recon/stoi", "{:.3f}"),
    ("ViSQOL", "recon/visqol", "{:.2f}"), ("mel dist.", "recon/mel_distance", "{:.2f}"),
    ("V/UV F1", "recon/vuv_f1", "{:.3f}"), ("SI-SDR", "recon/si_sdr", "{:.1f}"),
]


def fmt(v: Any, spec: str = "{:.4g}") -> str:
    return "–" if v is None else spec.format(v)


def audio_tags(rows: list[dict]) -> list[str]:
    """Tags of the log-mel classifier metrics (gen/fd_<tag>) of audio rows."""
    return sorted({k.split("fd_", 1)[1] for r in rows for k in r["metrics"] if k.startswith("gen/fd_")})


def extractor_tags(rows: list[dict]) -> list[str]:
    return sorted({k.split("fid_", 1)[1] for r in rows for k in r["metrics"] if k.split("/")[-1].startswith("fid_")})


def write_report(cfg: CompareConfig, rows: list[dict]) -> Path:
    out = Path(cfg.out)
    tags = extractor_tags(rows)
    audio = any("recon/pesq_count" in r["metrics"] for r in rows)
    headline = [c for c in COLUMNS if not (audio and c[1] in ("recon/psnr", "recon/ssim"))]
    headline += AUDIO_COLUMNS if audio else []
    for t in audio_tags(rows):
        headline += [(f"class acc. {t}", f"gen/class_accuracy_{t}", "{:.1%}"), (f"FD {t}", f"gen/fd_{t}", "{:.3g}"),
                     (f"IS {t}", f"gen/is_{t}", "{:.2f}")]
    for t in tags:
        headline += [(f"rFID {t}", f"recon/fid_{t}", "{:.3g}"), (f"gFID {t}", f"gen/fid_{t}", "{:.3g}"),
                     (f"gKID {t}", f"gen/kid_{t}", "{:.3g}"), (f"precision {t}", f"gen/precision_{t}", "{:.2f}"),
                     (f"recall {t}", f"gen/recall_{t}", "{:.2f}")]
    headline += [("class acc.", f"gen/class_accuracy_{t}", "{:.1%}") for t in tags
                 if any(f"gen/class_accuracy_{t}" in r["metrics"] for r in rows)]
    headline += [("prior val loss", "prior/val/loss", "{:.3f}")]
    headers = ["preset", "K"] + [h for h, _, _ in headline] + ["wall time"]
    intro = AUDIO_INTRO.format(tokenizer_data=cfg.tokenizer_data or cfg.data) if audio else IMAGE_INTRO
    lines = [f"# {cfg.title}", "",
             f"Data: `{cfg.data}`. Every number below was computed by `python -m pipelines.compare` in this run. "
             + intro, "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        m = r["metrics"]
        name = r["preset"] + (" (given)" if r.get("tokenizer") else "")
        cells = [name, "–" if r["K"] is None else f"{r['K']:,}"] + [fmt(m.get(key), spec) for _, key, spec in headline]
        cells.append(f"{sum(r['seconds'].values()):.0f} s")
        lines.append("| " + " | ".join(cells) + " |")
    given = [r for r in rows if r.get("tokenizer")]
    if given:
        lines += ["", "(given): a tokenizer not trained by this run (`--tokenizers`): " + "; ".join(
            f"{r['preset']} = `{r['tokenizer']}`" for r in given) + "; its wall time excludes tokenizer training."]
    lines += ["", "Wall time per stage (s): " + "; ".join(
        f"{r['preset']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()) for r in rows), ""]
    plot = plot_against_k(rows, out)
    if plot:
        lines += [f"![metrics vs K]({plot.name})", ""]
    lines += ["## Reconstructions (val: originals above, reconstructions below) and samples (one row per class)", "",
              "| preset | reconstructions | samples |", "|---|---|---|"]
    for r in rows:
        if r["grids"]:
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
        for q in sorted({r["quantizer"] for r in rows if r["K"] is not None}):
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


def main(cfg: CompareConfig) -> Path:
    for p in cfg.presets:  # a typo in a preset or a [stage] table fails before hours of training, not after
        parse_preset(p)
    for c in cfg.codecs:
        codec_baseline.parse_codec(c)
    for name, path in cfg.tokenizers.items():
        if name in cfg.presets or "/" in name:
            raise ConfigError(f"--tokenizers: row name {name!r} is also a preset or holds '/'; pick another name")
        resolve_checkpoint(path, hint="convert one with `python -m pipelines.import_official`")
    for stage, (_, cls) in STAGES.items():  # with stand-ins for the paths each preset fills in
        paths = {f.name: "<per preset>" for f in dataclasses.fields(cls) if f.metadata.get("required")}
        stage_config(cfg, stage, **paths)
    rows = [run_preset(cfg, p) for p in (*cfg.presets, *cfg.tokenizers)]
    rows += [run_codec(cfg, c) for c in cfg.codecs]
    report = write_report(cfg, rows)
    print(f"[compare] report: {report}")
    return report


if __name__ == "__main__":
    run(main, CompareConfig)
