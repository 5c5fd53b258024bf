#!/usr/bin/env bash
# Set up the virtual environment (idempotent) and run the default test suite.
# Extra arguments go to pytest, e.g. scripts/run_tests.sh -k compat
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv
exec .venv/bin/python -m pytest "$@"
