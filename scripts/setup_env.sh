#!/usr/bin/env bash
# Create (or update) the project's virtual environment and install rmt-fairseq into it.
# Idempotent: re-running reuses the venv. Usage: scripts/setup_env.sh [VENV_DIR]
#   PYTHON       interpreter for a new venv (default: python3.11, else python3)
#   TORCH_SPEC   torch requirement (default torch==2.13.0: the CPU wheel; a bare "torch"
#                would pull several GB of CUDA packages)
#   EXTRAS       pip extras to install (default: test)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-test}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# pip >= 24.1 refuses omegaconf 2.0.6's metadata (omegaconf#1187), which fairseq 0.12.2 needs.
"${PIP[@]}" install "pip<24.1"
"${PIP[@]}" install "$TORCH_SPEC"
"${PIP[@]}" install -e ".[${EXTRAS}]"
# fairseq pulls a torchaudio that cannot load against this torch; the LM code never uses it.
"${PIP[@]}" uninstall -y torchaudio >/dev/null 2>&1 || true
"$VENV/bin/python" -c "import fairseq, rmt_plugin; print('rmt-fairseq ready: fairseq', fairseq.__version__)"
