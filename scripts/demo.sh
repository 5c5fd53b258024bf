#!/usr/bin/env bash
# README command (1): set up, then show in two tables what RMT's memory does, with the stock
# fairseq-train, fairseq-eval-lm and the plugin's defaults, on 2 CPU cores in about 5 minutes.
#  1. Language modelling: rmt_tiny, the same model without memory and transformer_xl_tiny on the
#     embedded corpus (examples/data/tiny-wikitext2, byte level: bits per character), the same
#     budget each; fairseq-eval-lm --memory-diagnostics on the test split; a plot
#     (checkpoints/demo/diagnostics.png).
#  2. A dependency beyond Transformer-XL's reach: two symbols copied 27 tokens later (a memory
#     stream, rmt_plugin/memory_streams.py), segments of 8; a Transformer-XL of 2 layers with a cache
#     of 8 reaches 2 x 8 + 8 = 24 tokens back. Both models are trained with a curriculum over the gap
#     (3 epochs of gap 4, 2 of gap 12, 2 of gap 24: docs/memory_in_lm.md, section 3).
# The two parts run side by side, one core each. Idempotent: a rerun reuses the venv, the data and
# the finished checkpoints.
#   DEMO_UPDATES         training updates per language model (default 1000)
#   DEMO_COPY_EXAMPLES   training examples of each copy stream (default 15000)
#   DEMO_OUT             where checkpoints, logs and the plot go (default checkpoints/demo)
set -euo pipefail
OUT=$(realpath -m "${DEMO_OUT:-checkpoints/demo}")  # relative to where the demo is started
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh .venv
export PATH="$PWD/.venv/bin:$PATH" OMP_NUM_THREADS=1  # two processes on two cores
UPDATES=${DEMO_UPDATES:-1000}
EXAMPLES=${DEMO_COPY_EXAMPLES:-15000}
mkdir -p "$OUT"

# train SAVE_DIR DATA FLAGS...: fairseq-train unless SAVE_DIR holds a finished run of this command
train() {
  local save=$1 data=$2
  shift 2
  # fairseq-train resumed past its end still takes one more step, so a finished run is marked;
  # a run of another command (e.g. other DEMO_UPDATES) is started afresh.
  [ -f "$save/finished" ] && [ "$(cat "$save/finished")" = "$data $*" ] && return
  rm -rf "$save"
  fairseq-train "$data" --user-dir rmt_plugin --task rmt_lm --criterion rmt_lm "$@" \
    --optimizer adam --clip-norm 0.25 --save-dir "$save" --no-epoch-checkpoints --disable-validation \
    --log-format simple --log-interval 200 --num-workers 0 --seed 1 > "$save.train.log" 2>&1 \
    || { tail -5 "$save.train.log" >&2; echo "demo: training $save failed" >&2; return 1; }
  echo "$data $*" > "$save/finished"
}

language_modelling() {
  local data=data-bin/tiny-wikitext2-bytes name
  python scripts/prepare_wikitext.py --input examples/data/tiny-wikitext2 --level byte --destdir "$data"
  declare -A model=([baseline]="--arch rmt_tiny --num-mem-tokens 0" [rmt]="--arch rmt_tiny"
                    [transformer_xl]="--arch transformer_xl_tiny")
  for name in baseline rmt transformer_xl; do
    # shellcheck disable=SC2086  # model holds several flags
    train "$OUT/lm-$name" "$data" ${model[$name]} --tokens-per-sample 32 --batch-size 16 --lr 0.002 \
      --max-update "$UPDATES"
    if [ ! -f "$OUT/lm-$name/test-diagnostics.json" ]; then
      fairseq-eval-lm "$data" --path "$OUT/lm-$name/checkpoint_last.pt" --user-dir rmt_plugin --task rmt_lm \
        --gen-subset test --batch-size 4 --tokens-per-sample 32 --memory-diagnostics \
        --memory-diagnostics-file "$OUT/lm-$name/test-diagnostics.json" > "$OUT/lm-$name.eval.log" 2>&1 \
        || { tail -5 "$OUT/lm-$name.eval.log" >&2; return 1; }
    fi
  done
}

long_dependency() {
  local gap bins=() name
  for gap in 4 12 24; do
    [ -f "data-bin/demo-copy2-gap$gap-n$EXAMPLES/memory_stream.json" ] || python -m rmt_plugin.memory_streams write \
      --destdir "data-bin/demo-copy2-gap$gap-n$EXAMPLES" --source-len 2 --gap "$gap" --train-size "$EXAMPLES" \
      --test-size 500 2>/dev/null
  done
  bins=(data-bin/demo-copy2-gap{4,4,4,12,12,24,24}-n$EXAMPLES)
  declare -A model=([rmt]="--arch rmt_tiny --bptt-mode prefix --bptt-depth 4"
                    [transformer_xl]="--arch transformer_xl_tiny --mem-len 8")
  for name in rmt transformer_xl; do
    # shellcheck disable=SC2086
    train "$OUT/copy-$name" "$(IFS=:; echo "${bins[*]}")" ${model[$name]} --tokens-per-sample 8 \
      --segments-per-sample 8 --batch-size 16 --lr 0.001 --max-epoch 7
    [ -f "$OUT/copy-$name/test-score.json" ] || python -m rmt_plugin.memory_streams score \
      "data-bin/demo-copy2-gap24-n$EXAMPLES" --path "$OUT/copy-$name/checkpoint_last.pt" 2>/dev/null \
      | tail -1 > "$OUT/copy-$name/test-score.json"
  done
}

echo "== training: language models ($UPDATES updates each) and the long copy, side by side (about 5 minutes) =="
language_modelling > "$OUT/language_modelling.log" 2>&1 & lm=$!
long_dependency > "$OUT/long_dependency.log" 2>&1 & copy=$!
wait $lm || { tail -5 "$OUT/language_modelling.log" >&2; exit 1; }
wait $copy || { tail -5 "$OUT/long_dependency.log" >&2; exit 1; }

python - "$OUT" "$UPDATES" <<'EOF'
import json, sys
out, updates = sys.argv[1:]
print(f"\n1. Language modelling, test split of the embedded corpus, {updates} updates each (bits/char, lower is better)")
gains = ("memory_gain", "memory_swap_gain", "cache_gain", "cache_swap_gain")
print(f"{'model':<16}{'bits/char':>10}" + "".join(f"{g.replace('_gain', '').replace('_', ' '):>13}" for g in gains)
      + f"{'first segment':>15}")
for name in ("baseline", "rmt", "transformer_xl"):
    r = json.load(open(f"{out}/lm-{name}/test-diagnostics.json"))
    print(f"{name:<16}{r['loss']:>10.4f}" + "".join(f"{r[g]:>13.4f}" if g in r else f"{'-':>13}" for g in gains)
          + f"{r['loss_by_segment']['0']:>15.4f}")
print("memory / cache: bits/char lost when RMT's memory (Transformer-XL's cache) is reset at every segment;"
      "\nswap: lost when it is swapped for another stream's (what it holds of this stream);"
      "\nfirst segment: the loss before any memory or cache exists.")
print("\n2. Copy 2 symbols 27 tokens later, segments of 8 (test: 500 copies; chance: 0.01 exact, 0.1 per symbol)")
print(f"{'model':<36}{'exact match':>12}{'accuracy':>10}")
for name, label in (("rmt", "RMT (8 memory tokens)"), ("transformer_xl", "Transformer-XL (cache 8, reach 24)")):
    r = json.load(open(f"{out}/copy-{name}/test-score.json"))
    print(f"{label:<36}{r['exact_match']:>12.3f}{r['accuracy']:>10.3f}")
EOF
python scripts/plot_memory_diagnostics.py "$OUT/lm-baseline/test-diagnostics.json:no memory" \
  "$OUT/lm-rmt/test-diagnostics.json:RMT (8 memory tokens)" \
  "$OUT/lm-transformer_xl/test-diagnostics.json:Transformer-XL (cache 16)" \
  --out "$OUT/diagnostics.png" --title "tiny models on the embedded WikiText-2 slice, byte level, $UPDATES updates"
