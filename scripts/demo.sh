#!/usr/bin/env bash
# README command (1): set up, then train a tiny RMT, the same model without memory and a
# Transformer-XL on the embedded corpus (examples/data/tiny-wikitext2, byte level: the loss in
# base 2 is bits per character) with the same budget, evaluate each with fairseq-eval-lm and
# --memory-diagnostics, and print a comparison table and a plot (checkpoints/demo/diagnostics.png).
# Idempotent: a rerun reuses the venv, the data and the finished checkpoints.
#   DEMO_UPDATES  training updates per model (default 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv
export PATH="$PWD/.venv/bin:$PATH"
DATA=data-bin/tiny-wikitext2-bytes
OUT=checkpoints/demo
SEG=64
UPDATES=${DEMO_UPDATES:-1000}

python scripts/prepare_wikitext.py --input examples/data/tiny-wikitext2 --level byte --destdir "$DATA"

declare -A MODEL=(
  [baseline]="--arch rmt_tiny --num-mem-tokens 0"
  [rmt]="--arch rmt_tiny --num-mem-tokens 8"
  [transformer_xl]="--arch transformer_xl_tiny --mem-len $SEG"
)
for name in baseline rmt transformer_xl; do
  save="$OUT/$name"
  # fairseq-train resumed past --max-update still takes one more step, so a finished run is marked.
  if [ ! -f "$save/finished-$UPDATES" ]; then
    echo "== training $name ($UPDATES updates) =="
    # shellcheck disable=SC2086  # MODEL holds several flags
    fairseq-train "$DATA" --user-dir rmt_plugin \
      --task rmt_lm --tokens-per-sample "$SEG" --segments-per-sample 2 --batch-size 8 \
      ${MODEL[$name]} --criterion rmt_lm --bptt-depth 1 \
      --optimizer adam --lr 0.002 --clip-norm 0.25 --max-update "$UPDATES" \
      --save-dir "$save" --no-epoch-checkpoints --log-format simple --log-interval 200 \
      --num-workers 0 --seed 1 2>&1 | grep -E "valid on|done training" || true
    [ -f "$save/checkpoint_last.pt" ] || { echo "demo: training $name failed" >&2; exit 1; }
    touch "$save/finished-$UPDATES"
  fi
  if [ ! -f "$save/test-diagnostics.json" ] || [ "$save/checkpoint_last.pt" -nt "$save/test-diagnostics.json" ]; then
    fairseq-eval-lm "$DATA" --path "$save/checkpoint_last.pt" --user-dir rmt_plugin \
      --task rmt_lm --gen-subset test --batch-size 4 --tokens-per-sample "$SEG" \
      --memory-diagnostics --memory-diagnostics-file "$save/test-diagnostics.json" > "$save/eval.log" 2>&1 \
      || { tail -5 "$save/eval.log" >&2; exit 1; }
  fi
done

echo "== fairseq-eval-lm on the test split, $UPDATES updates each (bits per character) =="
python - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
gains = ("memory_gain", "memory_swap_gain", "cache_gain", "cache_swap_gain")
print(f"{'model':<16}{'bits/char':>10}" + "".join(f"{g.replace('_gain', '').replace('_', ' '):>13}" for g in gains)
      + f"{'first segment':>15}")
for name in ("baseline", "rmt", "transformer_xl"):
    r = json.load(open(f"{out}/{name}/test-diagnostics.json"))
    print(f"{name:<16}{r['loss']:>10.4f}" + "".join(f"{r[g]:>13.4f}" if g in r else f"{'-':>13}" for g in gains)
          + f"{r['loss_by_segment']['0']:>15.4f}")
print("bits/char lost when the memory (cache) is reset at every segment, or swapped for another stream's"
      " (the content); first segment: the loss before any memory or cache exists")
EOF
python scripts/plot_memory_diagnostics.py "$OUT/baseline/test-diagnostics.json:no memory" \
  "$OUT/rmt/test-diagnostics.json:RMT (8 memory tokens)" \
  "$OUT/transformer_xl/test-diagnostics.json:Transformer-XL (cache $SEG)" \
  --out "$OUT/diagnostics.png" --title "tiny models on the embedded WikiText-2 slice, byte level, $UPDATES updates"
