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

Seeds and intervals: `--seeds=0,1,2` runs every row once per seed s (tokenizer and prior `loop.seed` = s, sample seed
s x 1,000,000) into `<out>/<row>/seed-<s>/` (a given tokenizer's tokens and reconstruction, which no seed changes,
once in `<out>/<row>/`); without seeds a row is one run in `<out>/<row>/` with the [stage] tables' seeds. Each cell is
the mean over the seeds ± their standard deviation and the row's interval: one seed, the 95% bootstrap interval that
evaluate / reconstruct / codec_baseline wrote (`<metric>/ci95_lo|hi`, resampling the generated samples or the scored
clips); several seeds, the hull of mean ± 2 standard errors and the seeds' bootstrap intervals
(pipelines/metrics/intervals.py). The best mean of a column is bold and a row whose interval is disjoint from the
best's is marked †; nothing else is called a difference. Under the table a finding written from these numbers names
the best tokenizer on reconstruction and on generation and says where they disagree and by how much. report.json
keeps every run's own metrics (equal to its metrics.json) beside the row's mean, std and interval.

Finished stages are reused: each stage leaves `<stage>.done.json` with the exact config it ran with; a rerun skips
it when that config is unchanged, resumes an interrupted training run, and refuses when it changed (delete the stage
directory or pick another --out). Adding a seed or a preset runs only the new runs.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data.errors import UserError
from data.files import write_text_atomic
from pipelines import codec_baseline, encode_shards, evaluate, reconstruct, sample, train_prior, train_tokenizer
from pipelines.checkpoint import load_config, resolve_checkpoint
from pipelines.cli import run
from pipelines.config import ConfigError, from_dict, merge_config, required, to_dict
from pipelines.metrics.intervals import disjoint, read_interval, seed_interval
from tokenizer.quantizers import QUANTIZERS


@dataclass
class CompareConfig:
    data: str = required()  # labelled media shards (python -m pipelines.make_shards)
    out: str = "runs/compare"  # one sub-directory per preset, plus report.md and plots
    presets: tuple[str, ...] = ("simvq-1024", "simvq-8192", "simvq-65536", "vq-8192")  # <quantizer>-<K> each
    # One run of every row per seed s (tokenizer and prior loop.seed = s, sample seed = s x 1,000,000) in
    # <out>/<row>/seed-<s>/; () = one run with the [stage] tables' seeds in <out>/<row>/
    seeds: tuple[int, ...] = ()
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


SEEDED = {"tokenizer", "prior", "sample"}  # the stages a seed of `seeds` sets (the others are deterministic)


def with_seed(stage: str, stage_cfg: Any, seed: int | None) -> Any:
    """The stage config with the run's seed: loop.seed for training, seed x 1,000,000 for sampling (sample i uses
    seed + i, so seeds a million apart never share a sample seed); unchanged without one."""
    if seed is None or stage not in SEEDED:
        return stage_cfg
    if stage == "sample":
        return dataclasses.replace(stage_cfg, seed=seed * 1_000_000)
    return dataclasses.replace(stage_cfg, loop=dataclasses.replace(stage_cfg.loop, seed=seed))


def run_seed(cfg: CompareConfig, preset: str, seed: int | None) -> dict[str, Any]:
    """One run of a row: its stages in <out>/<preset>/ (seed None) or <out>/<preset>/seed-<seed>/. A given tokenizer's
    tokens and reconstruction do not depend on the seed and are shared by its seeds, in <out>/<preset>/."""
    given = cfg.tokenizers.get(preset)
    shared = Path(cfg.out) / preset
    root = shared if seed is None else shared / f"seed-{seed}"
    if given:  # an existing tokenizer: its row skips tokenizer training
        tok_dir = resolve_checkpoint(given, hint="convert one with `python -m pipelines.import_official`")
        tok = load_config(tok_dir)["config"]
        quantizer, k = tok["quantizer"], tok["num_codes"]
    else:
        tok_dir = root / "tokenizer"
        quantizer, k = parse_preset(preset)
    tokens_dir = (shared if given else root) / "tokens"
    recon_dir = (shared if given else root) / "recon"
    prior_dir, samples_dir, eval_dir = root / "prior", root / "samples", root / "eval"
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
        stages["reconstruct"] = (recon_dir, dict(data=tok_data, tokenizer=str(tok_dir), out=str(recon_dir)))
    results, seconds = {}, {}
    for stage, (directory, fixed) in stages.items():
        stage_cfg = with_seed(stage, stage_config(cfg, stage, **fixed), seed)
        results[stage], seconds[stage] = run_stage(stage, directory, stage_cfg)
    recon = {key.replace("val/", "recon/", 1): v for key, v in results.get("reconstruct", {}).items()}
    metrics = {**recon, **results["evaluate"], **{f"prior/{k2}": v for k2, v in (results["prior"] or {}).items()
                                                  if k2.startswith("val/")}}
    shown = recon_dir if cfg.tokenizer_data else eval_dir
    return {"seed": seed, "quantizer": quantizer, "K": k, "tokenizer": str(tok_dir) if given else None,
            "metrics": metrics, "seconds": seconds,
            "dirs": {stage: str(directory) for stage, (directory, _) in stages.items()},
            "grids": {"recon": str((shown / "recon.png").relative_to(cfg.out)),
                      "samples": str((samples_dir / "grid.png").relative_to(cfg.out))}}


def run_preset(cfg: CompareConfig, preset: str) -> dict[str, Any]:
    """A row: its runs (one per seed) and their aggregate."""
    runs = [run_seed(cfg, preset, seed) for seed in (cfg.seeds or (None,))]
    first = runs[0]
    return aggregate({"preset": preset, "quantizer": first["quantizer"], "K": first["K"],
                      "tokenizer": first["tokenizer"], "grids": first["grids"]}, runs)


def is_interval_key(key: str) -> bool:
    return key.endswith(("/ci95_lo", "/ci95_hi"))


def aggregate(row: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """`row` with its runs and, per metric every run has: `metrics` the mean over the runs, `std` the standard
    deviation over them (2+ runs), `intervals` the row's interval (intervals.seed_interval); `seconds` per stage,
    a stage directory shared by several runs counted once."""
    keys = [k for k in runs[0]["metrics"] if not is_interval_key(k)
            and all(isinstance(r["metrics"].get(k), (int, float)) for r in runs)]
    metrics, std, intervals = {}, {}, {}
    for k in keys:
        values = [float(r["metrics"][k]) for r in runs]
        metrics[k] = values[0] if len(values) == 1 else float(np.mean(values))
        if len(values) > 1:
            std[k] = float(np.std(values, ddof=1))
        interval = seed_interval(values, [read_interval(r["metrics"], k) for r in runs])
        if interval is not None:
            intervals[k] = list(interval)
    seconds: dict[str, float] = {}
    counted = set()
    for r in runs:
        for stage, t in r["seconds"].items():
            directory = r["dirs"][stage]
            if directory not in counted:
                seconds[stage] = seconds.get(stage, 0.0) + t
                counted.add(directory)
    return {**row, "seeds": [r["seed"] for r in runs], "metrics": metrics, "std": std, "intervals": intervals,
            "seconds": seconds, "runs": runs}


def run_codec(cfg: CompareConfig, name: str) -> dict[str, Any]:
    """A classical codec's row: its reconstruction metrics on the tokenizers' val clips (no prior, no samples)."""
    codec, bitrate = codec_baseline.parse_codec(name)
    directory = Path(cfg.out) / name
    fixed = dict(data=cfg.tokenizer_data or cfg.data, out=str(directory), codec=codec, bitrate=bitrate)
    result, seconds = run_stage("codec", directory, stage_config(cfg, "codec", **fixed))
    run_ = {"seed": None, "metrics": result, "seconds": {"codec": seconds}, "dirs": {"codec": str(directory)}}
    return aggregate({"preset": name, "quantizer": codec, "K": None, "tokenizer": None, "codec": True, "grids": {}},
                     [run_])


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


def audio_tags(rows: list[dict]) -> list[str]:
    """Tags of the log-mel classifier metrics (gen/fd_<tag>) of audio rows."""
    return sorted({k.split("fd_", 1)[1] for r in rows for k in r["metrics"] if k.startswith("gen/fd_")})


def extractor_tags(rows: list[dict]) -> list[str]:
    return sorted({k.split("fid_", 1)[1] for r in rows for k in r["metrics"] if k.split("/")[-1].startswith("fid_")})


# Which way is better, by a metric's name (its last path segment); other metrics (token counts, perplexity, the
# prior's loss over vocabularies of different sizes, kbps) have no better direction and are never marked.
HIGHER = ("utilisation", "psnr", "ssim", "precision_", "recall_", "f_score_", "class_accuracy", "is_", "pesq", "stoi",
          "visqol", "vuv_f1", "si_sdr", "snr")
LOWER = ("fid_", "kid_", "fd_", "mel_distance", "stft_distance", "recon_l1", "lpips")

INTERVAL_RULE = ("Each cell is the mean over the row's seeds, ± their standard deviation with 2+ seeds, and [lo, hi] "
                 "its interval: with one seed the 95% bootstrap interval over the generated samples (or over the "
                 "clips, for per-clip audio metrics; pipelines/metrics/intervals.py); with several seeds the hull of "
                 "mean ± 2 standard errors over the seeds and of every seed's bootstrap interval. **Bold**: the best "
                 "mean of a column whose metric has a better direction; †: this row's interval and the bold row's "
                 "are disjoint, a difference larger than both intervals. Overlapping intervals are never called a "
                 "difference, and a metric without an interval (one seed, no bootstrap) is never marked †.")


def direction(key: str) -> int:
    """+1 higher is better, -1 lower is better, 0 neither (counts, spreads, sizes)."""
    name = key.split("/")[-1]
    if name.endswith(("_count", "_failures")) or name.startswith(("kid_std", "is_std", "kid_subset")):
        return 0
    return 1 if name.startswith(HIGHER) else -1 if name.startswith(LOWER) else 0


def ranked(rows: list[dict], key: str) -> list[dict]:
    """The rows holding `key`, best first; [] for a metric without a direction."""
    sign = direction(key)
    held = [r for r in rows if key in r["metrics"]]
    return sorted(held, key=lambda r: -sign * r["metrics"][key]) if sign else []


def cell(r: dict, key: str, spec: str, best: dict | None) -> str:
    v = r["metrics"].get(key)
    if v is None:
        return "–"
    text = spec.format(v)
    if r["std"].get(key):  # a spread of exactly 0 (a token count) is left out, as is an interval of one point
        text += " ± " + spec.format(r["std"][key])
    interval = r["intervals"].get(key)
    if interval and interval[0] != interval[1]:
        text += f" [{spec.format(interval[0])}, {spec.format(interval[1])}]"
    if best is r:
        return f"**{text}**"
    if best is not None and disjoint(interval, best["intervals"].get(key)):
        text += " †"
    return text


def headline_columns(rows: list[dict], audio: bool) -> list[tuple[str, str, str]]:
    tags = extractor_tags(rows)
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
    return headline + [("prior val loss", "prior/val/loss", "{:.3f}")]


def describe(order: list[dict], key: str, label: str, spec: str) -> str:
    """One finding line: the best row of a ranking and which others are clearly (intervals disjoint) behind it."""
    best = order[0]
    value = lambda r: spec.format(r["metrics"][key])  # noqa: E731
    clear = [r for r in order[1:] if disjoint(best["intervals"].get(key), r["intervals"].get(key))]
    close = [r for r in order[1:] if r not in clear]
    text = f"**{label}**: best {best['preset']} ({value(best)})"
    if clear:
        text += "; better by more than the intervals than " + ", ".join(f"{r['preset']} ({value(r)})" for r in clear)
    if close:
        text += "; not separable from " + ", ".join(f"{r['preset']} ({value(r)})" for r in close)
    return text + "."


def gap(a: dict, b: dict, key: str, spec: str) -> str:
    """How far row a is from row b in one metric, and whether that exceeds their intervals."""
    va, vb = a["metrics"][key], b["metrics"][key]
    rel = f" ({abs(va - vb) / abs(vb):.0%})" if vb else ""
    beyond = disjoint(a["intervals"].get(key), b["intervals"].get(key))
    return (f"{spec.format(va)} vs {spec.format(vb)} for {b['preset']}, a gap of {spec.format(abs(va - vb))}{rel}, "
            f"{'larger than' if beyond else 'within'} their intervals")


def finding(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    """The written finding under the table, made from the numbers: the best tokenizer row on reconstruction (the
    first headline rFID, else PESQ/PSNR) and on generation (the first gFID, else FD), and where they disagree."""
    tokenizers = [r for r in rows if not r.get("codec")]
    by_key = {key: (label, spec) for label, key, spec in columns}

    def pick(prefix: str, preferred: tuple[str, ...]) -> str | None:
        keys = [k for k in by_key if k.startswith(prefix) and k.split("/")[-1].startswith(preferred)]
        return next((k for k in keys if len(ranked(tokenizers, k)) >= 2), None)

    recon_key = pick("recon/", ("fid_",)) or pick("recon/", ("pesq", "psnr", "mel_distance"))
    gen_key = pick("gen/", ("fid_", "fd_"))
    lines = []
    for key in (recon_key, gen_key):
        if key:
            lines.append("- " + describe(ranked(tokenizers, key), key, by_key[key][0], by_key[key][1])
                         .replace(": best ", ": best tokenizer " if len(tokenizers) < len(rows) else ": best ", 1))
    codecs = ranked([r for r in rows if r.get("codec")], recon_key) if recon_key else []
    if codecs:  # the classical codec rows (no prior): where the best tokenizer stands against the best of them
        label, spec = by_key[recon_key]
        lines.append(f"- Against the classical codecs on {label}: the best tokenizer, "
                     f"{ranked(tokenizers, recon_key)[0]['preset']}, has "
                     f"{gap(ranked(tokenizers, recon_key)[0], codecs[0], recon_key, spec)}.")
    if recon_key and gen_key:
        r_order, g_order = ranked(tokenizers, recon_key), ranked(tokenizers, gen_key)
        rb, gb = r_order[0], g_order[0]
        if rb is gb:
            lines.append(f"- Reconstruction and generation agree: {rb['preset']} is best on both.")
        elif rb in g_order and gb in r_order:
            (rl, rs), (gl, gs) = by_key[recon_key], by_key[gen_key]
            lines.append(
                f"- They disagree: {rb['preset']}, best on {rl}, ranks {g_order.index(rb) + 1} of {len(g_order)} on "
                f"{gl}: {gap(rb, gb, gen_key, gs)}. {gb['preset']}, best on {gl}, ranks "
                f"{r_order.index(gb) + 1} of {len(r_order)} on {rl}: {gap(gb, rb, recon_key, rs)}.")
    return ["## Finding (written by compare from the numbers above)", "", *lines, ""] if lines else []


def write_report(cfg: CompareConfig, rows: list[dict]) -> Path:
    out = Path(cfg.out)
    audio = any("recon/pesq_count" in r["metrics"] for r in rows)
    headline = headline_columns(rows, audio)
    headers = ["preset", "K"] + [h for h, _, _ in headline] + ["wall time"]
    intro = AUDIO_INTRO.format(tokenizer_data=cfg.tokenizer_data or cfg.data) if audio else IMAGE_INTRO
    seeds = f"Seeds: {', '.join(map(str, cfg.seeds))} (one run of every row per seed). " if cfg.seeds else ""
    lines = [f"# {cfg.title}", "",
             f"Data: `{cfg.data}`. Every number below was computed by `python -m pipelines.compare` in this run. "
             + intro, "", seeds + INTERVAL_RULE, "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    best = {key: (order[0] if len(order := ranked(rows, key)) >= 2 else None) for _, key, _ in headline}
    for r in rows:
        name = r["preset"] + (" (given)" if r.get("tokenizer") else "")
        cells = [name, "–" if r["K"] is None else f"{r['K']:,}"] + [cell(r, key, spec, best[key])
                                                                    for _, key, spec in headline]
        cells.append(f"{sum(r['seconds'].values()):.0f} s")
        lines.append("| " + " | ".join(cells) + " |")
    given = [r for r in rows if r.get("tokenizer")]
    if given:
        lines += ["", "(given): a tokenizer not trained by this run (`--tokenizers`): " + "; ".join(
            f"{r['preset']} = `{r['tokenizer']}`" for r in given) + "; its wall time excludes tokenizer training."]
    lines += ["", "Wall time per stage (s, all seeds): " + "; ".join(
        f"{r['preset']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()) for r in rows), ""]
    lines += finding(rows, headline)
    plot = plot_against_k(rows, out)
    if plot:
        lines += [f"![metrics vs K]({plot.name})", ""]
    lines += ["## Reconstructions (val: originals above, reconstructions below) and samples (one row per class)", "",
              "| preset | reconstructions | samples |", "|---|---|---|"]
    for r in rows:
        if r["grids"]:
            lines.append(f"| {r['preset']} | ![]({r['grids']['recon']}) | ![]({r['grids']['samples']}) |")
    keys = sorted({k for r in rows for k in r["metrics"]})
    lines += ["", "## All metrics (mean ± std over seeds [interval])", "",
              "| metric | " + " | ".join(r["preset"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
    lines += [f"| {k} | " + " | ".join(cell(r, k, "{:.4g}", None) for r in rows) + " |" for k in keys]
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
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"--seeds: {list(cfg.seeds)} repeats a seed; list each seed once")
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
