#!/usr/bin/env bash
# Set up the virtual environment (idempotent) and run the default test suite.
# Extra arguments go to pytest, e.g. scripts/run_tests.sh -k compat
#   TEST_WORKERS  pytest-xdist worker processes (default 2, one per core of the CI machine; 0: none).
#                 Test files are the unit of distribution, so a module's fixtures are built once.
#                 Each worker runs torch single-threaded: two processes with default threads on
#                 two cores stall each other (OpenMP spinning).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv
WORKERS=${TEST_WORKERS:-2}
if [ "$WORKERS" -gt 0 ]; then
  export OMP_NUM_THREADS=1
  exec .venv/bin/python -m pytest -n "$WORKERS" --dist loadfile "$@"
fi
exec .venv/bin/python -m pytest "$@"
