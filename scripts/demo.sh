#!/usr/bin/env bash
# README command (1): set up, then train and evaluate a tiny RMT on the embedded corpus
# (examples/data/tiny-wikitext2, byte level: the loss in base 2 is bits per character).
# Idempotent: a rerun reuses the venv, the data and the finished checkpoint.
#   DEMO_UPDATES  training updates (default 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv
export PATH="$PWD/.venv/bin:$PATH"
DATA=data-bin/tiny-wikitext2-bytes
SAVE=checkpoints/demo-rmt
SEG=64
UPDATES=${DEMO_UPDATES:-1000}

python scripts/prepare_wikitext.py --input examples/data/tiny-wikitext2 --level byte --destdir "$DATA"

# fairseq-train resumed past --max-update still takes one more step, so a finished run is marked.
if [ ! -f "$SAVE/finished-$UPDATES" ]; then
  fairseq-train "$DATA" --user-dir rmt_plugin \
    --task rmt_lm --tokens-per-sample "$SEG" --segments-per-sample 2 --batch-size 8 \
    --arch rmt_tiny --num-mem-tokens 8 \
    --criterion rmt_lm --bptt-depth 1 \
    --optimizer adam --lr 0.002 --clip-norm 0.25 --max-update "$UPDATES" \
    --save-dir "$SAVE" --no-epoch-checkpoints --log-format simple --log-interval 50 \
    --num-workers 0 --seed 1
  touch "$SAVE/finished-$UPDATES"
fi

echo "== fairseq-eval-lm on the test split (bits per character = Loss (base 2)) =="
fairseq-eval-lm "$DATA" --path "$SAVE/checkpoint_last.pt" --user-dir rmt_plugin \
  --task rmt_lm --gen-subset test --batch-size 4 --tokens-per-sample "$SEG" 2>&1 \
  | grep -E "num. model params|Evaluated|Loss \(base 2\)"
