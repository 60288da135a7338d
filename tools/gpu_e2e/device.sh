#!/usr/bin/env bash
# Run tools.gpu_e2e on the device machine, from the repository root of its copy.
#   bash tools/gpu_e2e/device.sh [tool args: --models ... --impl ... --quick --budget-s ...]
# Needs wheels/ carried (b10_transfer-*.whl, blake3, zstandard for Python 3.12).
# Work files go to /tmp/gpu_e2e (E2E_WORK), the volumes to the real /cache (a throwaway root
# machine), so both implementations run with their path checks unpatched; results.json,
# report.md, logs.tar.gz and console.log are copied to $OUT after every step.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
WORK=${E2E_WORK:-/tmp/gpu_e2e}
EXPORT=${OUT:-$WORK/export}
mkdir -p "$EXPORT" /cache
rm -rf "$WORK" /cache/local/gpu_e2e-* /cache/work/gpu_e2e-* /cache/model/gpu_e2e-* /cache/org/gpu_e2e-*
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>&1 | tee "$EXPORT/console.log"
python3 -m tools.gpu_e2e --out "$WORK" --cache-root /cache --wheels wheels --export "$EXPORT" \
  --case-timeout 480 "$@" 2>&1 \
  | tee -a "$EXPORT/console.log"
