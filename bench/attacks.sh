#!/usr/bin/env bash
# Peak RSS and slots of a release cbgate under the hostile-client attacks of issue 11 (WebSocket
# frame amplification, preface-only and idle h2c connections, upstream fan-out, stalled bodies).
# Loopback only. Writes bench/results-attacks-<date>.md. Knobs: CONNS=1100 ONLY=name,name
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)
TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
VENV=$TARGET_DIR/attack-venv
command -v openssl >/dev/null 2>&1 || { apt-get update && apt-get install -y --no-install-recommends openssl; }
if [ ! -x "$VENV/bin/python3" ] || ! cmp -s "$BENCH_DIR/attack-requirements.txt" "$VENV/requirements.txt"; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python3" -m pip install --quiet --disable-pip-version-check -r "$BENCH_DIR/attack-requirements.txt"
  cp "$BENCH_DIR/attack-requirements.txt" "$VENV/requirements.txt"
fi
(cd "$REPO" && cargo build --release --locked --bin cbgate)
out=$BENCH_DIR/results-attacks-$(date +%Y-%m-%d).md
{
  echo "# cbgate under attack, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(git -C "$REPO" rev-parse --short HEAD)"
  echo
  "$VENV/bin/python3" "$BENCH_DIR/attacks.py" --binary "$TARGET_DIR/release/cbgate" \
    --conns "${CONNS:-1100}" --only "${ONLY:-}"
} | tee "$out"
