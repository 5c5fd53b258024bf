#!/usr/bin/env bash
# enwik8, RMT m=20, BPTT-1: the RMT paper's test bits per character 1.229.
# Rendered from examples/enwik8/recipes.yaml by examples/make_recipes.py: edit the table, not this file.
# The model is the paper's: --arch rmt_enwik8_base sets every architecture value explicitly,
# so a change of the plugin's defaults does not change this recipe.
# Evaluations (Loss (base 2) of fairseq-eval-lm): the paper 1.229.
#
# Usage: RAW=path/to/enwik8.zip bash examples/enwik8/rmt_m20_bptt1.sh [extra fairseq-train flags]
#   BPTT as the authors' training loop runs it (--bptt-mode authors); for BPTT as the method
#   describes it, add --bptt-mode sliding (docs/authors_model.md).
#   GPUS  GPUs on this node (default 4): the paper's 64 streams per update are
#         --distributed-world-size GPUS x --batch-size 64/GPUS (GPUS must divide 64);
#         over several nodes, fairseq's --distributed-* flags with the same product.
#   DATA  data-bin (default data-bin/enwik8); SAVE  checkpoints (default checkpoints/enwik8/rmt_m20_bptt1)
#   PREPARE  1: prepare DATA from RAW (the default); 0: use DATA, any data-bin, as it is
#   SMOKE  1: a smoke run, NOT the paper's: the row's memory, BPTT and segment length at 2 layers,
#         d_model 64, one process, batch 2, 20 updates, 2 validation steps, the evaluations on the
#         first 1/50 of the test split; SAVE defaults to checkpoints/enwik8/rmt_m20_bptt1-smoke, and
#         a DATA that holds a dict.txt is used as it is (PREPARE=0). Flags given to the script
#         override these values (--max-update 200 --d-model 128 ...).
# Hydra: fairseq-hydra-train --config-dir examples/enwik8/configs --config-name rmt_m20_bptt1 task.data=DATA
set -euo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n "2,/^set -euo/{/^#/s/^# \{0,1\}//p}" "$0"
  exit 0
fi
RAW=${RAW:-enwik8.zip}
DATA=${DATA:-data-bin/enwik8}
SMOKE=${SMOKE:-0}
if [[ -z "${PREPARE:-}" ]]; then  # a smoke run takes a data-bin that is there as it is
  PREPARE=1
  if [[ "$SMOKE" == 1 && -f "$DATA/dict.txt" ]]; then PREPARE=0; fi
fi
for var in SMOKE PREPARE; do
  if [[ "${!var}" != 0 && "${!var}" != 1 ]]; then
    echo "error: $var=${!var}: set $var=1 or $var=0" >&2
    exit 1
  fi
done
if [[ "$SMOKE" == 1 ]]; then
  echo "SMOKE RUN of rmt_m20_bptt1.sh, NOT the paper's run: the row's memory, BPTT and segment length at 2 layers, d_model 64, one process, batch 2, 20 updates, 2 validation steps, the evaluations on the first 1/50 of the test split"
  SAVE=${SAVE:-checkpoints/enwik8/rmt_m20_bptt1-smoke}
fi
SAVE=${SAVE:-checkpoints/enwik8/rmt_m20_bptt1}
GPUS=${GPUS:-4}
if (( 64 % GPUS )); then
  echo "error: GPUS=$GPUS does not divide the paper's batch of 64 streams" >&2
  exit 1
fi

# 1. data (idempotent: a rerun with valid outputs does nothing)
if [[ "$PREPARE" == 1 ]]; then
  rmt-prepare-enwik8 --input "$RAW" --destdir "$DATA"
elif [[ -f "$DATA/dict.txt" ]]; then
  echo "using the data-bin DATA=$DATA as it is (PREPARE=0: not prepared from RAW)"
else
  echo "error: DATA=$DATA holds no dict.txt, so it is no fairseq data-bin; with PREPARE=1 it is prepared from RAW" >&2
  exit 1
fi

# Smoke run (SMOKE=1): the row's memory, BPTT and segment length at 2 layers, d_model 64, one
# process, batch 2, 20 updates, 2 validation steps, the evaluations on the first 1/50 of the test
# split.
TEST_SET=(--gen-subset test)
if [[ "$SMOKE" == 1 ]]; then
  set -- --n-layer 2 --d-model 64 --n-head 2 --d-head 32 --d-inner 128 --distributed-world-size 1 --batch-size 2 --max-valid-steps 2 --max-update 20 --log-interval 5 "$@"
  TEST_SET+=(--num-shards 50 --shard-id 0)
fi

# 2. train
fairseq-train "$DATA" \
  --user-dir rmt_plugin --task rmt_lm --tokens-per-sample 128 --segments-per-sample 1 \
  --arch rmt_enwik8_base --num-mem-tokens 20 --memory-layout rmt --mem-len 0 \
  --criterion rmt_lm --bptt-depth 1 --bptt-mode authors --memory-token-loss-weight 0.0 \
  --optimizer adam --adam-betas '(0.9, 0.999)' --adam-eps 1e-08 --weight-decay 0.0 \
  --lr-scheduler cosine --warmup-updates 0 \
  --lr 0.00025 --clip-norm 0.25 --max-update 400000 \
  --distributed-world-size "$GPUS" --batch-size $((64 / GPUS)) \
  --save-dir "$SAVE" --no-epoch-checkpoints --keep-interval-updates 1 --validate-interval-updates 4000 --save-interval-updates 4000 \
  --log-format json --log-interval 200 --tensorboard-logdir "$SAVE/tb" "$@"

# 3. evaluate, the paper's setting: training segment length and memory: test bits per character 1.229 (Loss (base 2) below)
fairseq-eval-lm "$DATA" --path "$SAVE/checkpoint_best.pt" --user-dir rmt_plugin --task rmt_lm \
  "${TEST_SET[@]}" --tokens-per-sample 128 --batch-size 10

if [[ "$SMOKE" == 1 ]]; then
  echo "SMOKE RUN of rmt_m20_bptt1.sh finished: it ran; its numbers are not the paper's (run without SMOKE=1 for that)"
fi
