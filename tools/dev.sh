#!/usr/bin/env bash
# Developer entry point: creates .venv on first use (CPU torch 2.13, the project, test tools), then runs a job.
#   bash tools/dev.sh demo   # compile a small model, save it to a local stand-in volume, load it back, compare
#   bash tools/dev.sh test   # ruff, mypy, then the whole test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ] || [ ! -x "$VENV/bin/ruff" ] || [ ! -x "$VENV/bin/mypy" ] \
   || ! "$VENV/bin/python" -c "import torch, blake3, zstandard, msgpack, filelock, pytest, hypothesis, mfusepy, mypy, obstore, moto, cas, b10_transfer" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # torch 2.13.0 CPU: pip takes it from the machine's local wheel; a range would pull a multi-GB CUDA build.
  "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q -e ".[test]"
fi
# FUSE (for tools/slowfs and its tests): best effort, the tests skip with a reason without it.
if ! command -v fusermount3 >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get install -y -q fuse3 >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q fuse3 >/dev/null 2>&1; }) || true
fi
job=${1:-test}; shift || true
case "$job" in
  demo) exec "$VENV/bin/python" -m b10_transfer.demo "$@" ;;
  test)  # lint and type checks first (config in pyproject.toml); any finding fails the job before pytest runs
    "$VENV/bin/ruff" check cas b10_transfer
    "$VENV/bin/mypy"
    exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@" ;;
  *) echo "usage: bash tools/dev.sh demo|test [args]" >&2; exit 2 ;;
esac
