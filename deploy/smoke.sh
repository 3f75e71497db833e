#!/usr/bin/env bash
# Build, run, ask and stop the vqa-serve image with a real Docker engine: see deploy/smoke.py
# (the steps, what each checks) and docs/deploy.md (the results). Needs root (dockerd,
# debootstrap), a Docker engine or dockerd, and the test environment
# (python3 -m venv .venv && .venv/bin/pip install -e '.[test]'), whose Python it runs on.
#   deploy/smoke.sh                      # everything, then clean up
#   deploy/smoke.sh --steps engine,base,build --keep-base
#   deploy/smoke.sh --dry-run            # print the commands only (CI does this)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${VQA_SMOKE_PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
exec "$python" deploy/smoke.py "$@"
