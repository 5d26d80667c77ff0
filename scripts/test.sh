#!/usr/bin/env bash
# Set everything up, then run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# One worker per core, at most 4 (each loads its own bundled models), a test file per worker (its module fixtures
# load once); tests/conftest.py gives each worker its share of the cores.
exec .venv/bin/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile "$@"
