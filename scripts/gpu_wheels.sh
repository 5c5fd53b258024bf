#!/usr/bin/env bash
# Everything scripts/gpu_benchmark.sh needs on the GPU machine that it does not have, into .whl/
# (git-ignored; about 27 MB, within the device tool's 64 MiB carry). Run here, where PyPI is
# reachable, once per session (nothing outside the repository lasts between sessions):
#
#   bash scripts/gpu_wheels.sh [WIKITEXT2_DIR]      (default: ../shared/data/wikitext-2)
#
# The GPU machine has Python 3.12 with a CUDA torch, numpy 2, sacrebleu, regex, pyyaml and a
# transformers too new for fairseq's Transformer-XL (TransfoXL left transformers in 5.x), and no
# internet. So .whl/ gets, for CPython 3.12 on x86-64 Linux:
#   - fairseq 0.12.2, built here from its sdist with Python 3.12 against numpy 2 (PyPI has no
#     wheel): its Cython data code; without torch at build time its optional C++ extensions
#     (libbase, libnat: models this project does not use) are left out, so the wheel does not
#     depend on a torch ABI;
#   - antlr4-python3-runtime 4.8 (an sdist, pure Python), hydra-core 1.0.7, omegaconf 2.0.6,
#     bitarray: fairseq's own requirements the machine lacks;
#   - transformers 4.35.2, tokenizers 0.15.2, huggingface-hub 0.36.2: the versions the CPU suite
#     runs fairseq's truncated_bptt Transformer-XL with (its HuggingFace TransfoXL);
#   - data/wikitext-2/*.xz: the raw WikiText-2 the benchmark prepares at byte level there.
set -euo pipefail
cd "$(dirname "$0")/.."
WIKITEXT2=${1:-../shared/data/wikitext-2}
DEST=.whl
PY312=$(bash scripts/check_py312.sh --find-python) || { echo "gpu_wheels: no Python 3.12 here (set PYTHON312)" >&2; exit 2; }
for split in train valid test; do
  [ -f "$WIKITEXT2/wiki.$split.tokens.xz" ] || { echo "gpu_wheels: $WIKITEXT2/wiki.$split.tokens.xz is missing" >&2; exit 2; }
done

rm -rf "$DEST"
mkdir -p "$DEST/data/wikitext-2"
cp "$WIKITEXT2"/wiki.{train,valid,test}.tokens.xz "$DEST/data/wikitext-2/"

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
pip_download() { "$PY312" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "$@"; }
pip_download bitarray==3.12.3 tokenizers==0.15.2
pip_download hydra-core==1.0.7 omegaconf==2.0.6 transformers==4.35.2 huggingface-hub==0.36.2

BUILD=$(mktemp -d -t gpu_wheels.XXXXXX)
trap 'rm -rf "$BUILD"' EXIT
"$PY312" -m venv "$BUILD/venv"
"$BUILD/venv/bin/python" -m pip install -q "pip<24.1" setuptools wheel cython "numpy>=2"
# --no-build-isolation: fairseq's setup.py needs numpy, which its build requirements do not name
"$BUILD/venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" \
  fairseq==0.12.2 antlr4-python3-runtime==4.8

ls -l "$DEST"
du -sh "$DEST"
