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
# at the target, the totals), tta.log (everything), history.csv, train.log (both refreshed every 5 s
# during training, so a kill from outside still leaves the epochs finished; checkpoints stay out).
# Time: a hard cap of TTA_BUDGET_S (default 420 s, so that gpu_check.sh fits in the same 15-minute
# device lease): the training gets what the setup left; a run cut by it reports the epochs it finished.
# A compiled run that fails before finishing an epoch is retried once with trainer.compile=false.
# Data: ALLCONV_BENCH_CIFAR (a folder holding cifar-10-batches-py) if set, else /work/cifar if it
# holds one, else built from cifar10-jpg.tar.gz + build_cifar10.py in .data/ (else in the shared
# folder) (~20-40 s; JPEG is lossy, so the accuracy is comparable to the official release's only
# roughly). TTA_FORCE_BUILD=1 skips the first two and always builds. TTA_DATA_CACHE=DIR builds into DIR/cifar,
# and a later run with the same DIR reuses it (several runs in one device call build once).
# Env: PYTHON, OUT, TTA_BUDGET_S, TTA_TARGET (0.9275), TTA_SITE (wheel target, /tmp/site),
# TTA_FORCE_BUILD, TTA_DATA_CACHE, TTA_CARRIED_DATA (default .data), ALLCONV_SHARED_DATA (the folder with the archive,
# default ../shared/data).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/benchmarks"
DATA="${TTA_CARRIED_DATA:-$ROOT/.data}"  # what --fetch fills and the device call carries
# shellcheck source=benchmarks/_device_env.sh
source "$BENCH/_device_env.sh"

MODE=gpu
OVERRIDES=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) MODE=dry ;;
    --fetch) MODE=fetch ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) echo "time_to_accuracy.sh: unknown option $arg (use --dry-run, --fetch, or train overrides)" >&2; exit 2 ;;
    *) OVERRIDES+=("$arg") ;;
  esac
done

SHARED="${ALLCONV_SHARED_DATA:-$ROOT/../shared/data}"

fetch() {
  local shared="$SHARED"
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

# history.csv and train.log of the current run ($RUN) into $OUT, now and every 5 s in the background:
# the device tool may kill the whole command at its own limit, and what is under $OUT still comes
# back (the checkpoints, 11 MB each, stay in the work dir)
RUN="" COPIER=""
copy_out() {
  local f
  for f in history.csv train.log; do
    if [[ -f "$RUN/$f" ]]; then cp "$RUN/$f" "$OUT_BASE/.$f.part" && mv -f "$OUT_BASE/.$f.part" "$OUT_BASE/$f" || true; fi
  done
}
start_copier() {
  local me=$BASHPID  # the loop ends with this shell even if stop_copier never runs
  ( while kill -0 "$me" 2>/dev/null; do sleep 5; copy_out; done ) >/dev/null 2>&1 &
  COPIER=$!
}
stop_copier() {
  if [[ -n $COPIER ]]; then kill "$COPIER" 2>/dev/null || true; wait "$COPIER" 2>/dev/null || true; fi
  COPIER=""
}

main() {
  local PY WORK CIFAR BUDGET TARGET
  PY="$(pick_python)"
  WORK="$(mktemp -d -t allconv-tta-XXXX)"
  trap 'stop_copier; rm -rf "$WORK"' EXIT
  export WANDB_MODE=disabled PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
  BUDGET="${TTA_BUDGET_S:-$([[ $MODE == dry ]] && echo 1200 || echo 420)}"
  TARGET="${TTA_TARGET:-0.9275}"
  echo "mode: $([[ $MODE == dry ]] && echo 'DRY RUN (CPU, tiny net, data subset)' || echo GPU); budget ${BUDGET} s; target ${TARGET}"
  echo "python: $PY; output: $OUT_BASE"
  use_checkout "$PY" "$WORK" "${TTA_SITE:-/tmp/site}"
  if [[ $MODE == gpu ]] && [[ $CHECKOUT_CUDA != 1 ]]; then
    echo "FATAL: no CUDA device visible; use --dry-run on a CPU machine" >&2
    exit 1
  fi

  # the data: a given folder, this machine's rebuilt copy, or built here from the carried archive
  # (.data/, else the shared folder: a checkout beside it can build without --fetch)
  local force="${TTA_FORCE_BUILD:-0}" src=""
  if [[ -f "$DATA/cifar10-jpg.tar.gz" && -f "$DATA/build_cifar10.py" ]]; then
    src="$DATA"
  elif [[ -f "$SHARED/cifar10-jpg.tar.gz" && -f "$SHARED/build_cifar10.py" ]]; then
    src="$SHARED"
  fi
  if [[ $force != 1 && -n "${ALLCONV_BENCH_CIFAR:-}" ]]; then
    CIFAR="$ALLCONV_BENCH_CIFAR"
  elif [[ $force != 1 && -d /work/cifar/cifar-10-batches-py ]]; then
    CIFAR=/work/cifar
  elif [[ -n $src ]]; then
    CIFAR="${TTA_DATA_CACHE:-$WORK}/cifar"  # TTA_DATA_CACHE: kept for the next run of the same device call
    if [[ $force != 1 && -d "$CIFAR/cifar-10-batches-py" ]]; then
      echo "reusing the CIFAR-10 built in $CIFAR (TTA_DATA_CACHE)"
    else
      local t=$(date +%s)
      mkdir -p "$CIFAR"
      (cd "$WORK" && "$PY" "$src/build_cifar10.py" "$CIFAR" >/dev/null)
      echo "built CIFAR-10 from the JPEG archive in $src in $(( $(date +%s) - t )) s$([[ $force == 1 ]] && echo ' (TTA_FORCE_BUILD=1)')"
    fi
  else
    echo "FATAL: no CIFAR-10: run 'bash benchmarks/time_to_accuracy.sh --fetch' here and carry .data, or set ALLCONV_BENCH_CIFAR (not with TTA_FORCE_BUILD=1)" >&2
    exit 1
  fi
  [[ -d "$CIFAR/cifar-10-batches-py" ]] || { echo "FATAL: $CIFAR/cifar-10-batches-py missing" >&2; exit 1; }

  local -a ARGS META
  ARGS=(experiment=fast "data.root=$CIFAR" wandb.mode=disabled trainer.progress=log trainer.log_every_steps=100
        trainer.compile=true)  # the dry run compiles too: the same path, on CPU
  if [[ $MODE == dry ]]; then
    ARGS+=(trainer.device=cpu model.width=0.125 trainer.epochs=2 data.train_size=2000 data.test_size=500
           trainer.batch_size=100 trainer.log_every_steps=10)
  else
    ARGS+=(trainer.device=cuda)
  fi
  ARGS+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})
  local compile=false a
  for a in "${ARGS[@]}"; do case "$a" in trainer.compile=*) compile="${a#*=}" ;; esac; done  # the last one wins
  local left=$(( BUDGET - $(elapsed) - 20 )) rc=0 t wall
  if (( left < 60 )); then
    echo "FATAL: ${left} s left of TTA_BUDGET_S=${BUDGET} after the setup: too little to train; raise TTA_BUDGET_S" >&2
    exit 1
  fi
  # train_once RUN_DIR CAP [MORE OVERRIDES]: one training run; sets rc and wall
  train_once() {
    RUN="$1"; local cap="$2"; shift 2
    echo "allconv-hpc train ${ARGS[*]}${*:+ $*}  (cap ${cap} s; run dir $RUN)"
    rc=0; t=$(date +%s)
    start_copier
    (cd "$WORK" && timeout --kill-after=15 "$cap" "$PY" -m allconv_hpc.cli train "${ARGS[@]}" "hydra.run.dir=$RUN" "$@") || rc=$?
    wall=$(( $(date +%s) - t ))
    stop_copier; copy_out
    if (( rc == 124 || rc == 137 )); then echo "the run hit the ${cap} s cap: reporting the epochs it finished"; fi
  }
  train_once "$WORK/run" "$left"
  local ran="${ARGS[*]}"
  META=()
  # a torch.compile/Triton failure on the device must still give a figure: once more, eager, when the
  # compiled run failed (not timed out) before any epoch finished
  if (( rc != 0 && rc != 124 && rc != 137 )) && [[ $compile == true ]] \
     && ! { [[ -f "$RUN/history.csv" ]] && (( $(wc -l < "$RUN/history.csv") > 1 )); }; then
    left=$(( BUDGET - $(elapsed) - 20 ))
    if (( left >= 60 )); then
      echo "RETRY: the compiled run exited $rc before finishing an epoch (torch.compile/Triton?); retrying ONCE with trainer.compile=false for the ${left} s left"
      META=(--meta "compile_retry=the compiled run exited $rc after ${wall} s before finishing an epoch; these results are the trainer.compile=false rerun")
      compile=false ran+=" trainer.compile=false trainer.compile_mode=default"  # a mode needs compile=true
      train_once "$WORK/run_eager" "$left" trainer.compile=false trainer.compile_mode=default
    else
      echo "the compiled run exited $rc before finishing an epoch; only ${left} s left, too little to retry without compile"
    fi
  fi
  "$PY" "$BENCH/_tta_summary.py" --history "$RUN/history.csv" --target "$TARGET" --wall-s "$wall" \
    --exit-code "$rc" --out "$OUT_BASE/tta.json" --meta "mode=$MODE" --meta "overrides=$ran" --meta "compile=$compile" \
    --meta "data=$CIFAR" --meta "budget_s=$BUDGET" ${META[@]+"${META[@]}"}
  echo "total $(elapsed) s"
  (( rc == 0 || rc == 124 || rc == 137 ))
}

OUT_BASE="${OUT:-$(mktemp -d -t allconv-tta-out-XXXX)}"
mkdir -p "$OUT_BASE"
set -o pipefail
main 2>&1 | tee "$OUT_BASE/tta.log"
exit "${PIPESTATUS[0]}"
