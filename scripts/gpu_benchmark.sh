#!/usr/bin/env bash
# Issue #11's GPU checks in one call of the device tool (an H200; the call should take about 5
# minutes of the session's 15):
#
#   here:   bash scripts/gpu_wheels.sh                    (wheels and WikiText-2 into .whl/)
#   there:  run(command="bash scripts/gpu_benchmark.sh", carry=[".whl"], timeout_s=540)
#
# It installs .whl/ into a venv that also sees the machine's own torch, prepares WikiText-2,
# then runs scripts/benchmark.py on the GPU: the paper's enwik8 backbone (12 layers, d_model 512),
# fairseq's --bf16, T = 128, m = 20, 64 streams, K = 4; tokens/s, eval-lm tokens/s, MFU against the
# measured bf16 matrix-product rate, the ratio to fairseq's truncated_bptt Transformer-XL, and
# peak memory against the BPTT depth and K with and without --memory-replay. Last, 30 updates of
# fairseq-train with --arch rmt_enwik8_base --bf16 (loss finite and falling). Everything lands in
# $OUT (the device tool brings it back); the tables end the output.
#
# Dry run on the CPU (tiny sizes, fp32, no GPU): everything else, over any Python 3.12 with torch:
#   GPU_BENCHMARK_DEVICE=cpu GPU_BENCHMARK_PYTHON=.venv312/bin/python bash scripts/gpu_benchmark.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d -t gpu_benchmark.XXXXXX)}
DEVICE=${GPU_BENCHMARK_DEVICE:-cuda}
PYTHON=${GPU_BENCHMARK_PYTHON:-python3}  # the interpreter that holds torch (there: python3)
WORK=$(mktemp -d -t rmt-gpu.XXXXXX)
VENV=$WORK/venv DATA=$WORK/wt2-byte
[ -d .whl ] || { echo "gpu_benchmark: .whl/ is missing: run scripts/gpu_wheels.sh here and carry .whl" >&2; exit 2; }

purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
# A venv of our packages that also sees $PYTHON's: that python3 is itself a venv (its torch is not
# in the base interpreter's site-packages, so --system-site-packages would not find it). The .pth
# appends $PYTHON's site-packages after the venv's own, so the carried versions win.
"$PYTHON" -m venv --without-pip "$VENV"
echo "import site; site.addsitedir('$(purelib "$PYTHON")')" >"$(purelib "$VENV/bin/python")/00-base-site.pth"
# fairseq 0.12.2 runs on Python 3.12 through rmt_compat (the repo's copy), which rmt_compat.pth loads
export PYTHONPATH=$PWD PATH=$VENV/bin:$PATH PYTHONUNBUFFERED=1
"$VENV/bin/python" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check .whl/*.whl
cp rmt_compat.pth "$(purelib "$VENV/bin/python")/"
PY=$VENV/bin/python

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv || true
  "$PY" -W ignore -c "import torch, fairseq, transformers; print('python', __import__('sys').version.split()[0], 'torch',
torch.__version__, 'cuda', torch.cuda.is_available(), 'fairseq', fairseq.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

"$PY" scripts/prepare_wikitext.py --input .whl/data/wikitext-2 --level byte --destdir "$DATA" --workers 8 \
  >"$OUT/prepare.log" 2>&1 || { tail -20 "$OUT/prepare.log"; exit 1; }

MODELS=(transformer_lm truncated_bptt_xl baseline transformer_xl rmt_chunk rmt_chunk_replay rmt_sliding
        rmt_sliding_replay rmt_xl)
if [ "$DEVICE" = cuda ]; then
  BENCH=(--size enwik8_base --bf16 --batch-size 64 --num-mem-tokens 20 --train-steps 5 --eval-batches 20)
  TRAIN=(--arch rmt_enwik8_base --bf16 --batch-size 16 --tokens-per-sample 128)
else
  BENCH=(--size tiny --batch-size 2 --num-mem-tokens 2 --tokens-per-sample 16 --train-steps 1 --eval-batches 2)
  TRAIN=(--arch rmt_tiny --cpu --batch-size 2 --tokens-per-sample 16)
fi

# a model that fails is named at the end of benchmark.md; the rest still runs
"$PY" scripts/benchmark.py --data "$DATA" --device "$DEVICE" "${BENCH[@]}" --models "${MODELS[@]}" --repeats 1 \
  --out "$OUT/benchmark.md" 2>"$OUT/benchmark.log" || tail -30 "$OUT/benchmark.log"

fairseq-train "$DATA" --user-dir rmt_plugin --task rmt_lm --criterion rmt_lm "${TRAIN[@]}" --segments-per-sample 4 \
  --bptt-depth 1 --optimizer adam --lr 2.5e-4 --clip-norm 0.25 --max-update 30 --log-format simple \
  --log-interval 10 --no-save --disable-validation --num-workers 0 --seed 1 >"$OUT/train.log" 2>&1 \
  || { tail -30 "$OUT/train.log"; exit 1; }
grep -E "\| epoch 001:|done training" "$OUT/train.log" | tail -4
cat "$OUT/benchmark.md"
