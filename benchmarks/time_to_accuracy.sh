#!/usr/bin/env bash
# Time to accuracy: `experiment=fast` (+ trainer.compile=true) on real CIFAR-10 on one GPU, and the
# training seconds until the paper's 92.75% test accuracy.
#
#   bash benchmarks/time_to_accuracy.sh --fetch      # HERE, once: CIFAR-10 (JPEG archive, 19.6 MB) and its
#                                                    # build script into .data/, the wheels into .whl/
#   bash benchmarks/time_to_accuracy.sh [OVERRIDES]  # on the GPU machine; carry .whl and .data (README.md)
#   bash benchmarks/time_to_accuracy.sh --dry-run    # on CPU: the same path, 2 epochs of a tiny net on a subset
#
# OVERRIDES go to `allconv-hpc train` after the recipe's, e.g. trainer.epochs=40 optim.lr=0.2.
# Output in $OUT (a temp folder if unset): tta.json (per-epoch val_acc and seconds, the first epoch
# at the target, the totals), tta.log (everything), history.csv, train.log.
# Time: a hard cap of TTA_BUDGET_S (default 420 s, so that gpu_check.sh fits in the same 15-minute
# device lease): the training gets what the setup left; a run cut by it reports the epochs it finished.
# Data: ALLCONV_BENCH_CIFAR (a folder holding cifar-10-batches-py) if set, else /work/cifar if it
# holds one, else built from .data/cifar10-jpg.tar.gz (~20-40 s; JPEG is lossy, so the accuracy is
# comparable to the official release's only roughly).
# Env: PYTHON, OUT, TTA_BUDGET_S, TTA_TARGET (0.9275), TTA_SITE (wheel target, /tmp/site),
# ALLCONV_SHARED_DATA (--fetch: the folder with the archive, default ../shared/data).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/benchmarks"
DATA="$ROOT/.data"
# shellcheck source=benchmarks/_device_env.sh
source "$BENCH/_device_env.sh"

MODE=gpu
OVERRIDES=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) MODE=dry ;;
    --fetch) MODE=fetch ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    -*) echo "time_to_accuracy.sh: unknown option $arg (use --dry-run, --fetch, or train overrides)" >&2; exit 2 ;;
    *) OVERRIDES+=("$arg") ;;
  esac
done

fetch() {
  local shared="${ALLCONV_SHARED_DATA:-$ROOT/../shared/data}"
  for f in cifar10-jpg.tar.gz build_cifar10.py; do
    [[ -f "$shared/$f" ]] || { echo "FATAL: $shared/$f not found; set ALLCONV_SHARED_DATA to the folder holding it" >&2; exit 1; }
  done
  mkdir -p "$DATA"
  install -m 0644 "$shared/cifar10-jpg.tar.gz" "$shared/build_cifar10.py" "$DATA/"
  if [[ -d "$ROOT/.git" ]] && ! grep -qxF '/.data/' "$ROOT/.git/info/exclude" 2>/dev/null; then
    mkdir -p "$ROOT/.git/info" && echo '/.data/' >> "$ROOT/.git/info/exclude"
    echo "added /.data/ to .git/info/exclude"
  fi
  ls -l "$DATA"
  if ! compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
    bash "$BENCH/gpu_check.sh" --fetch-wheels
  fi
  echo "done. On the GPU machine:"
  echo "  run(command='bash benchmarks/time_to_accuracy.sh', carry=['.whl', '.data'], timeout_s=600)"
}

if [[ $MODE == fetch ]]; then
  fetch
  exit 0
fi

T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

main() {
  local PY WORK CIFAR BUDGET TARGET
  PY="$(pick_python)"
  WORK="$(mktemp -d -t allconv-tta-XXXX)"
  trap 'rm -rf "$WORK"' EXIT
  export WANDB_MODE=disabled PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
  BUDGET="${TTA_BUDGET_S:-$([[ $MODE == dry ]] && echo 1200 || echo 420)}"
  TARGET="${TTA_TARGET:-0.9275}"
  echo "mode: $([[ $MODE == dry ]] && echo 'DRY RUN (CPU, tiny net, data subset)' || echo GPU); budget ${BUDGET} s; target ${TARGET}"
  echo "python: $PY; output: $OUT_BASE"
  use_checkout "$PY" "$WORK" "${TTA_SITE:-/tmp/site}"
  if [[ $MODE == gpu ]] && ! (cd "$WORK" && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"); then
    echo "FATAL: no CUDA device visible; use --dry-run on a CPU machine" >&2
    exit 1
  fi

  # the data: a given folder, this machine's rebuilt copy, or built here from the carried archive
  if [[ -n "${ALLCONV_BENCH_CIFAR:-}" ]]; then
    CIFAR="$ALLCONV_BENCH_CIFAR"
  elif [[ -d /work/cifar/cifar-10-batches-py ]]; then
    CIFAR=/work/cifar
  elif [[ -f "$DATA/cifar10-jpg.tar.gz" && -f "$DATA/build_cifar10.py" ]]; then
    CIFAR="$WORK/cifar"
    local t=$(date +%s)
    (cd "$WORK" && "$PY" "$DATA/build_cifar10.py" "$CIFAR" >/dev/null)
    echo "built CIFAR-10 from the JPEG archive in $(( $(date +%s) - t )) s"
  else
    echo "FATAL: no CIFAR-10: run 'bash benchmarks/time_to_accuracy.sh --fetch' here and carry .data, or set ALLCONV_BENCH_CIFAR" >&2
    exit 1
  fi
  [[ -d "$CIFAR/cifar-10-batches-py" ]] || { echo "FATAL: $CIFAR/cifar-10-batches-py missing" >&2; exit 1; }

  local -a ARGS
  ARGS=(experiment=fast "data.root=$CIFAR" wandb.mode=disabled trainer.progress=log trainer.log_every_steps=100
        "hydra.run.dir=$WORK/run")
  if [[ $MODE == dry ]]; then
    ARGS+=(trainer.device=cpu model.width=0.125 trainer.epochs=2 data.train_size=2000 data.test_size=500
           trainer.batch_size=100 trainer.log_every_steps=10)
  else
    ARGS+=(trainer.device=cuda trainer.compile=true)
  fi
  ARGS+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})
  local left=$(( BUDGET - $(elapsed) - 20 )) rc=0 t
  if (( left < 60 )); then
    echo "FATAL: ${left} s left of TTA_BUDGET_S=${BUDGET} after the setup: too little to train; raise TTA_BUDGET_S" >&2
    exit 1
  fi
  echo "allconv-hpc train ${ARGS[*]}  (cap ${left} s)"
  t=$(date +%s)
  (cd "$WORK" && timeout --kill-after=15 "$left" "$PY" -m allconv_hpc.cli train "${ARGS[@]}") || rc=$?
  local wall=$(( $(date +%s) - t ))
  (( rc == 124 || rc == 137 )) && echo "the run hit the ${left} s cap: reporting the epochs it finished"
  cp "$WORK/run/history.csv" "$WORK/run/train.log" "$OUT_BASE/" 2>/dev/null || true
  "$PY" "$BENCH/_tta_summary.py" --history "$WORK/run/history.csv" --target "$TARGET" --wall-s "$wall" \
    --exit-code "$rc" --out "$OUT_BASE/tta.json" --meta "mode=$MODE" --meta "overrides=${ARGS[*]}" \
    --meta "data=$CIFAR" --meta "budget_s=$BUDGET"
  echo "total $(elapsed) s"
  (( rc == 0 || rc == 124 || rc == 137 ))
}

OUT_BASE="${OUT:-$(mktemp -d -t allconv-tta-out-XXXX)}"
mkdir -p "$OUT_BASE"
set -o pipefail
main 2>&1 | tee "$OUT_BASE/tta.log"
exit "${PIPESTATUS[0]}"
