#!/usr/bin/env bash
# Import and short-train check of rmt-fairseq (stock fairseq 0.12.2 + rmt_compat) on Python 3.12.
#
# Usage: scripts/check_py312.sh [VENV_DIR]        (default VENV_DIR: .venv312, git-ignored)
#        scripts/check_py312.sh --find-python     print the 3.12 interpreter, exit 1 if none
#
# Creates the venv idempotently (a second run reuses it and installs nothing new), installs
# TORCH_SPEC, pip<24.1 and the project, removes torchaudio, then runs the checks and prints a
# PASS/FAIL/SKIP summary. Exit code: 0 when nothing failed, 1 when a check failed, 2 when no
# Python 3.12 interpreter was found or the environment could not be installed.
#
# Environment:
#   PYTHON312      the interpreter (default: python3.12 on PATH, else pyenv's 3.12.x)
#   TORCH_SPEC     torch requirement (default torch==2.14.1). PyPI has no CPU-only Linux x86_64
#                  wheel: every torch there is a CUDA build that pulls ~2 GB of nvidia-*/triton wheels.
#                  2.14.1 is the cheapest here because its nvidia-* wheels are the ones this
#                  machine's local package mirror holds (~0.9 GB from PyPI here instead of ~1.9 GB
#                  for torch==2.11.0, the GPU machine's version; both pass). Any torch >= 2.0
#                  should do. The venv takes ~5.5 GB of disk.
#   INSTALL_MODE   editable (pip install -e ., default) or wheel (pip install .)
#   WORKDIR        where the corpus, data-bin and checkpoints go (default: a fresh temp dir,
#                  removed with the log on success unless KEEP_WORKDIR=1)
#   TRAIN_ARGS     extra fairseq-train/eval-lm device arguments (default: --cpu; with --cpu the
#                  hydra run gets common.cpu=true)
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

find_python312() {
  local cand
  for cand in "${PYTHON312:-}" "$(command -v python3.12 2>/dev/null)" \
      "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
    [ -n "$cand" ] && [ -x "$cand" ] || continue
    if "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$cand"
      return 0
    fi
  done
  return 1
}

if [ "${1:-}" = "--find-python" ]; then
  find_python312
  exit
fi

VENV=${1:-.venv312}
case "$VENV" in /*) ;; *) VENV=$REPO/$VENV ;; esac
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}
INSTALL_MODE=${INSTALL_MODE:-editable}
TRAIN_ARGS=${TRAIN_ARGS:---cpu}

PY312=$(find_python312) || {
  echo "check_py312: no Python 3.12 interpreter found (set PYTHON312)" >&2
  exit 2
}

declare -a RESULTS=()
FAILED=0
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
record() {  # record STATUS NAME SECONDS
  RESULTS+=("$(printf '%-5s %-46s %7ss' "$1" "$2" "$3")")
  [ "$1" = FAIL ] && FAILED=1
  echo "=== $1: $2 (${3}s)"
}
# step NAME COMMAND...: runs it in a subshell, records PASS or FAIL with its wall time, prints the
# output's tail and appends the whole output to $LOGDIR/all.log.
step() {
  local name=$1 t0 rc
  shift
  echo "=== $name"
  t0=$(now)
  ( "$@" ) >"$LOGDIR/step.log" 2>&1  # a subshell: steps may cd
  rc=$?
  tail -n "${TAIL_LINES:-15}" "$LOGDIR/step.log"
  cat "$LOGDIR/step.log" >>"$LOGDIR/all.log"
  if [ $rc -eq 0 ]; then record PASS "$name" "$(elapsed "$t0")"; else record FAIL "$name (rc=$rc)" "$(elapsed "$t0")"; fi
  return $rc
}

summary() {
  echo
  echo "================ check_py312 summary ($("$VENV/bin/python" -V 2>&1), $TORCH_SPEC, $INSTALL_MODE)"
  printf '%s\n' "${RESULTS[@]}"
  if [ $FAILED -eq 0 ]; then echo "RESULT: PASS"; else echo "RESULT: FAIL (full log: $LOGDIR/all.log)"; fi
}

LOGDIR=$(mktemp -d -t check_py312.XXXXXX)
if [ -z "${WORKDIR:-}" ]; then WORKDIR=$LOGDIR/work; fi
mkdir -p "$WORKDIR"
echo "check_py312: interpreter $PY312, venv $VENV, torch '$TORCH_SPEC', install $INSTALL_MODE, work dir $WORKDIR"

# ------------------------------------------------------------------------------- environment
make_venv() {
  [ -x "$VENV/bin/python" ] || "$PY312" -m venv "$VENV" || return
  # pip >= 24.1 refuses omegaconf 2.0.6's metadata (omegaconf#1187), which fairseq 0.12.2 needs.
  "$VENV/bin/python" -m pip --disable-pip-version-check install -q "pip<24.1"
}
install_torch() {
  "$VENV/bin/python" -m pip --disable-pip-version-check install "$TORCH_SPEC" || return
  "$VENV/bin/python" -c "import torch; print('torch', torch.__version__)"
}
install_project() {
  local pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
  case "$INSTALL_MODE" in
    editable) "${pip[@]}" install -q -e . ;;
    wheel) "${pip[@]}" install -q . ;;
    *) echo "INSTALL_MODE must be editable or wheel, not '$INSTALL_MODE'"; return 1 ;;
  esac || return
  # fairseq pulls a torchaudio that cannot load against this torch; the LM code never uses it.
  "${pip[@]}" uninstall -q -y torchaudio 2>/dev/null || true
  "$VENV/bin/python" -c "import torch, numpy, fairseq; print('torch', torch.__version__, '| numpy', numpy.__version__, '| fairseq', fairseq.__version__)"
}
if ! { step "venv with pip<24.1" make_venv &&
       TAIL_LINES=3 step "install $TORCH_SPEC" install_torch &&
       step "install project ($INSTALL_MODE), remove torchaudio" install_project; }; then
  summary
  exit 2
fi
PY="$VENV/bin/python"
BIN="$VENV/bin"
# Run from the work dir, so that the installed copies are imported, not the repository's.
py_outside_repo() { cd "$WORKDIR" && "$PY" "$@"; }

# ------------------------------------------------------------------------------- (a) imports
step "rmt_compat.pth installed and active at startup" py_outside_repo -c '
import sys, sysconfig, os
pth = os.path.join(sysconfig.get_paths()["purelib"], "rmt_compat.pth")
assert os.path.isfile(pth), "missing " + pth
assert any(type(f).__name__ == "_Finder" and type(f).__module__ == "rmt_compat" for f in sys.meta_path), \
    "rmt_compat finder not on sys.meta_path: the .pth did not run"
print("ok:", pth)
'
step "import fairseq, fairseq_cli.train, rmt_plugin" py_outside_repo -c '
import sys, fairseq, fairseq_cli.train, rmt_plugin, rmt_compat
print("ok: python", sys.version.split()[0], "fairseq", fairseq.__version__)
print("rmt_plugin from", rmt_plugin.__file__, "| rmt_compat from", rmt_compat.__file__)
'
# The layer is scoped: code outside fairseq/fairseq_cli/hydra keeps 3.12 + numpy 2 behaviour.
step "scoping: non-fairseq code keeps modern behaviour" py_outside_repo -c '
import dataclasses, fairseq, fairseq_cli.train, numpy as np
from fairseq.dataclass.configs import FairseqConfig, CommonConfig
assert type(FairseqConfig.__dataclass_fields__["common"].default) is CommonConfig  # 3.10 semantics

@dataclasses.dataclass
class Inner:
    x: int = 0

for label, default in [("dataclass instance", Inner()), ("dict", {})]:
    try:
        @dataclasses.dataclass
        class Outer:
            inner: object = default
    except ValueError as e:
        print("ok: unhashable default (%s) still raises: %s" % (label, e))
    else:
        raise AssertionError("unhashable default (%s) accepted outside fairseq" % label)

for name in ("float", "int", "compat"):  # (numpy 2 has np.long again, as C long)
    try:
        getattr(np, name)
    except AttributeError:
        print("ok: np.%s raises for a non-fairseq caller" % name)
    else:
        raise AssertionError("np.%s served to a non-fairseq caller" % name)

# ... while code inside fairseq still gets the aliases (what token_block_dataset needs).
g = {"__name__": "fairseq.data.some_module", "np": np}
exec("x = (np.float, np.int, np.compat.long)", g)
assert g["x"] == (float, int, int), g["x"]
print("ok: fairseq code sees np.float / np.int / np.compat.long")
'

# ------------------------------------------------------------------------------- (b) training
make_corpus() {
  "$PY" - "$WORKDIR" <<'EOF'
import random, sys, os
rng = random.Random(0)
for split, n in [("train", 200), ("valid", 20), ("test", 21)]:
    with open(os.path.join(sys.argv[1], split + ".txt"), "w") as f:
        for _ in range(n):
            f.write(" ".join("w%d" % rng.randrange(20) for _ in range(rng.randint(3, 11))) + "\n")
EOF
  cd "$WORKDIR" && "$BIN/fairseq-preprocess" --only-source --trainpref train.txt --validpref valid.txt \
    --testpref test.txt --destdir bin --workers 1
}
step "fairseq-preprocess --only-source" make_corpus

# shellcheck disable=SC2086  # TRAIN_ARGS is a word list
train_lm() {
  cd "$WORKDIR" && "$BIN/fairseq-train" bin --task language_modeling --arch transformer_lm \
    --decoder-layers 1 --decoder-embed-dim 32 --decoder-ffn-embed-dim 64 --decoder-attention-heads 2 \
    --tokens-per-sample 32 --sample-break-mode eos --batch-size 8 --max-update 10 \
    --optimizer adam --lr 1e-3 --save-dir ckpt_lm --no-epoch-checkpoints --num-workers 0 \
    --log-format simple --log-interval 5 --seed 1 $TRAIN_ARGS \
  && test -f ckpt_lm/checkpoint_last.pt
}
step "fairseq-train transformer_lm (10 updates, --sample-break-mode eos)" train_lm

# shellcheck disable=SC2086
eval_lm() {
  cd "$WORKDIR" && "$BIN/fairseq-eval-lm" bin --path ckpt_lm/checkpoint_last.pt --gen-subset test \
    --batch-size 4 --tokens-per-sample 32 $TRAIN_ARGS 2>&1 | tee eval_lm.log \
  && grep -q "Perplexity" eval_lm.log
}
step "fairseq-eval-lm transformer_lm" eval_lm

# The RMT model through the stock CLI, by package name (--user-dir rmt_plugin, from outside the
# repo). Skipped while rmt_plugin does not register the rmt_lm task / rmt_tiny arch / rmt_lm criterion.
rmt_missing=$(cd "$WORKDIR" && "$PY" -c '
from argparse import Namespace
from fairseq import utils
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.tasks import TASK_REGISTRY
try:
    utils.import_user_module(Namespace(user_dir="rmt_plugin"))
except Exception as e:
    print("rmt_plugin does not import: %r" % e)
else:
    missing = [what for what, ok in [("task rmt_lm", "rmt_lm" in TASK_REGISTRY),
                                     ("arch rmt_tiny", "rmt_tiny" in ARCH_MODEL_REGISTRY),
                                     ("criterion rmt_lm", "rmt_lm" in CRITERION_REGISTRY)] if not ok]
    print(", ".join(missing))
' 2>/dev/null | tail -n 1)
if [ -n "$rmt_missing" ]; then
  echo "=== SKIP rmt runs: $rmt_missing"
  record SKIP "rmt_tiny train/eval-lm ($rmt_missing)" 0
else
  # shellcheck disable=SC2086
  train_rmt() {
    cd "$WORKDIR" && "$BIN/fairseq-train" bin --user-dir rmt_plugin --task rmt_lm --arch rmt_tiny \
      --criterion rmt_lm --num-mem-tokens 4 --bptt-depth 1 --segments-per-sample 2 \
      --tokens-per-sample 16 --batch-size 4 --max-update 10 --optimizer adam --lr 1e-3 \
      --save-dir ckpt_rmt --no-epoch-checkpoints --num-workers 0 --log-format simple \
      --log-interval 5 --seed 1 $TRAIN_ARGS \
    && test -f ckpt_rmt/checkpoint_last.pt
  }
  step "fairseq-train --user-dir rmt_plugin rmt_tiny (10 updates)" train_rmt
  # shellcheck disable=SC2086
  eval_rmt() {
    cd "$WORKDIR" && "$BIN/fairseq-eval-lm" bin --user-dir rmt_plugin --task rmt_lm \
      --path ckpt_rmt/checkpoint_last.pt --gen-subset test --batch-size 2 --tokens-per-sample 8 \
      $TRAIN_ARGS 2>&1 | tee eval_rmt.log \
    && grep -q "Perplexity" eval_rmt.log
  }
  step "fairseq-eval-lm rmt_tiny" eval_rmt
fi

# ------------------------------------------------------------------------------- (c) hydra
hydra_train() {
  local cpu=false
  case " $TRAIN_ARGS " in *" --cpu "*) cpu=true ;; esac
  mkdir -p "$WORKDIR/hydra" && cd "$WORKDIR/hydra" && "$BIN/fairseq-hydra-train" \
    task=language_modeling task.data="$WORKDIR/bin" task.tokens_per_sample=32 \
    model=transformer_lm model.decoder_layers=1 model.decoder_embed_dim=32 \
    model.decoder_ffn_embed_dim=64 model.decoder_attention_heads=2 \
    optimizer=adam "optimization.lr=[0.001]" optimization.max_update=5 dataset.batch_size=8 \
    dataset.num_workers=0 checkpoint.save_dir=ckpt checkpoint.no_epoch_checkpoints=true \
    common.cpu=$cpu common.log_format=simple common.seed=1 \
  && test -f ckpt/checkpoint_last.pt
}
step "fairseq-hydra-train transformer_lm (5 updates)" hydra_train

summary
if [ $FAILED -eq 0 ] && [ -z "${KEEP_WORKDIR:-}" ] && [ "$WORKDIR" = "$LOGDIR/work" ]; then
  rm -rf "$LOGDIR"
fi
exit $FAILED
