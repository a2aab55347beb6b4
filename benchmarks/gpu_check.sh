#!/usr/bin/env bash
# One-shot GPU check for allconv_hpc on one CUDA GPU (H100/H200), no network, < 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run  # on CPU: the same python code paths, tiny sizes
#
# Sections: environment + exact FLOP count; bf16 vs fp32 loss agreement (bare loop and the real
# Trainer); `allconv-hpc train` under torchrun (1 rank: completes, writes a checkpoint, resumes);
# a 1-rank NCCL process group + DDP step; synchronising CUDA calls per Trainer step; bf16 matmul
# peak; img/s for precision x compile x channels_last at width 1, batch 512 with MFU; Trainer vs
# bare loop at batch 128; checkpoint save/load and its cost at every_steps=500; one 50k epoch
# (synthetic data: /work/cifar is not on the GPU machine); 2 ranks sharing the GPU over gloo.
# Results: JSON per section in $OUT/gpu_check (or a temp folder), summary table at the end.
# Env: PYTHON (interpreter to use), OUT (output folder), GPU_CHECK_DEADLINE_S (default 420:
# sections not started by then are skipped so the whole run stays under 8 minutes).
set -euo pipefail

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run or nothing)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/benchmarks"
DEADLINE="${GPU_CHECK_DEADLINE_S:-$([[ $DRY == 1 ]] && echo 1800 || echo 420)}"
OUT_BASE="${OUT:-$(mktemp -d -t allconv-gpu-check-XXXX)}"
OUTDIR="$OUT_BASE/gpu_check"
WORK="$(mktemp -d -t allconv-gpu-work-XXXX)"   # neutral cwd: the repo folder itself is not on sys.path
mkdir -p "$OUTDIR"
trap 'rm -rf "$WORK"' EXIT

if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]] && "$ROOT/.venv/bin/python" -c "import torch" >/dev/null 2>&1; then
  PY="$ROOT/.venv/bin/python"
else
  PY="$(command -v python3 || command -v python)"
fi
export WANDB_MODE=disabled PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1

header() { printf '\n==================== %s ====================\n' "$*"; }

header "setup"
echo "repo: $ROOT"
echo "python: $PY"
echo "output: $OUTDIR"
echo "mode: $([[ $DRY == 1 ]] && echo 'DRY RUN (CPU, tiny sizes)' || echo 'GPU')"
if ! (cd "$WORK" && "$PY" -c "import torch, hydra, omegaconf, numpy") ; then
  echo "FATAL: $PY lacks torch/hydra-core/omegaconf/numpy; set PYTHON=/path/to/python with them installed" >&2
  exit 1
fi
if ! (cd "$WORK" && "$PY" -c "import allconv_hpc.conf") >/dev/null 2>&1; then
  # not installed: an overlay package with conf/ mapped to allconv_hpc.conf, as pyproject's package-dir does
  mkdir -p "$WORK/overlay/allconv_hpc"
  for f in "$ROOT"/allconv_hpc/*.py; do ln -s "$f" "$WORK/overlay/allconv_hpc/"; done
  ln -s "$ROOT/conf" "$WORK/overlay/allconv_hpc/conf"
  export PYTHONPATH="$WORK/overlay${PYTHONPATH:+:$PYTHONPATH}"
  echo "allconv_hpc is not installed in $PY: using an overlay at $WORK/overlay"
fi
(cd "$WORK" && "$PY" -c "import allconv_hpc.conf, torch; print('allconv_hpc from', allconv_hpc.__file__); print('torch', torch.__version__, 'cuda available:', torch.cuda.is_available())")
if [[ $DRY == 0 ]] && ! (cd "$WORK" && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"); then
  echo "FATAL: no CUDA device visible; use --dry-run on a CPU machine" >&2
  exit 1
fi
if [[ $DRY == 1 ]]; then
  DRYFLAG=(--dry-run); DEV=cpu; BACKEND=gloo; WIDTH=0.125; NTRAIN=256; BATCH=32; EXTRA=(trainer.threads=1)
else
  DRYFLAG=(); DEV=cuda; BACKEND=nccl; WIDTH=1.0; NTRAIN=2048; BATCH=128; EXTRA=()
fi

declare -a RESULTS=()
FAILED=0
# section NAME TIMEOUT_S CMD...: header, run in $WORK under a timeout, record ok/FAIL/skipped, never abort
section() {
  local name="$1" limit="$2"; shift 2
  header "$name"
  if (( SECONDS > DEADLINE )); then
    echo "skipped: ${SECONDS}s elapsed > deadline ${DEADLINE}s"
    RESULTS+=("$(printf '%-34s %-8s %6s' "$name" skipped -)")
    return 0
  fi
  local t0=$SECONDS rc=0
  (cd "$WORK" && timeout --kill-after=10 "$limit" "$@") || rc=$?
  local status=ok
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT"; FAILED=1
  elif (( rc != 0 )); then status="FAIL($rc)"; FAILED=1; fi
  RESULTS+=("$(printf '%-34s %-8s %5ss' "$name" "$status" $((SECONDS - t0)))")
  echo "-> $name: $status in $((SECONDS - t0)) s"
}

GB=("$PY" "$BENCH/gpu_bench.py" --out "$OUTDIR" ${DRYFLAG[@]+"${DRYFLAG[@]}"})
TORCHRUN=("$PY" -m torch.distributed.run --standalone)
TRAIN_ARGS=(data=synthetic "data.train_size=$NTRAIN" data.test_size=256 "model.width=$WIDTH"
            "trainer.batch_size=$BATCH" "trainer.device=$DEV" trainer.log_every_steps=4 trainer.progress=log
            checkpoint.every_steps=5 wandb.mode=disabled ${EXTRA[@]+"${EXTRA[@]}"})

ddp_one_rank() {  # torchrun, 1 rank: train 1 epoch (checkpoints), then resume into epoch 2
  local run="$WORK/run1"
  "${TORCHRUN[@]}" --nproc_per_node=1 -m allconv_hpc.cli train "${TRAIN_ARGS[@]}" "dist.backend=$BACKEND" \
    trainer.epochs=1 "hydra.run.dir=$run"
  test -s "$run/checkpoints/last.pt" || { echo "no checkpoint written in $run/checkpoints" >&2; return 1; }
  ls -l "$run/checkpoints"
  "${TORCHRUN[@]}" --nproc_per_node=1 -m allconv_hpc.cli train "${TRAIN_ARGS[@]}" "dist.backend=$BACKEND" \
    trainer.epochs=2 "hydra.run.dir=$run" | tee "$WORK/resume.log"
  grep -q "resumed from" "$WORK/resume.log" || { echo "second run did not resume" >&2; return 1; }
  grep -q "done: best val_acc" "$WORK/resume.log"
  echo "note: with WORLD_SIZE=1 the package takes its single-process path (no process group); the"
  echo "      'nccl-ddp' section checks an NCCL group + DDP directly"
}

ddp_two_ranks() {  # 2 ranks sharing the one device over gloo: the Trainer's real DDP path on $DEV
  local run="$WORK/run2"
  "${TORCHRUN[@]}" --nproc_per_node=2 -m allconv_hpc.cli train "${TRAIN_ARGS[@]}" dist.backend=gloo \
    trainer.epochs=1 "hydra.run.dir=$run" trainer.threads=1
  test -s "$run/checkpoints/last.pt" || { echo "no checkpoint written in $run/checkpoints" >&2; return 1; }
  echo "2-rank run completed; checkpoint $(ls "$run/checkpoints")"
}

section "environment + FLOP count"            60 "${GB[@]}" env
section "bf16 vs fp32 loss agreement"        180 "${GB[@]}" correctness
section "torchrun 1 rank: train+ckpt+resume" 180 bash -c "$(declare -p TORCHRUN TRAIN_ARGS BACKEND WORK); $(declare -f ddp_one_rank); ddp_one_rank"
section "nccl-ddp (1-rank group + DDP)"       90 "${GB[@]}" nccl
section "CUDA syncs per Trainer step"         90 "${GB[@]}" syncs
section "bf16 matmul peak"                    60 "${GB[@]}" matmul
GRID_BUDGET=$(( DEADLINE - SECONDS - 120 )); (( GRID_BUDGET < 30 )) && GRID_BUDGET=30
section "throughput grid (+MFU)"             $(( GRID_BUDGET + 120 )) "${GB[@]}" grid --budget-s "$GRID_BUDGET"
section "Trainer vs bare loop, batch 128"    120 "${GB[@]}" overhead
section "checkpoint save/load"               120 "${GB[@]}" checkpoint
section "one 50k epoch via fit()"            180 "${GB[@]}" epoch
section "torchrun 2 ranks (gloo, one device)" 150 bash -c "$(declare -p TORCHRUN TRAIN_ARGS WORK); $(declare -f ddp_two_ranks); ddp_two_ranks"

header "summary"
(cd "$WORK" && "${GB[@]}" summary) || true
echo
printf '%s\n' "${RESULTS[@]}"
echo "total: ${SECONDS} s; JSON in $OUTDIR"
if (( FAILED )); then
  echo "gpu_check: SOME SECTIONS FAILED" >&2
  exit 1
fi
echo "gpu_check: all sections passed"
