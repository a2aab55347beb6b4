#!/usr/bin/env bash
# One-shot GPU check for allconv_hpc on one CUDA GPU (H100/H200), no network, < 8 minutes.
#
#   bash benchmarks/gpu_check.sh --fetch-wheels  # HERE (with the package registry): fill .whl/ once
#   bash benchmarks/gpu_check.sh                 # on the GPU machine (carry .whl: README.md)
#   bash benchmarks/gpu_check.sh --dry-run       # on CPU: the same python code paths, tiny sizes
#
# Sections: environment + exact FLOP count; bf16/TF32 vs strict fp32 (same weights per step, and
# the real Trainer's loss trajectory); `allconv-hpc train` under torchrun (1 rank: train, checkpoint,
# resume, then `evaluate` on CUDA against the run's test score); the package's own NCCL process group + DDP (1 rank); synchronising CUDA calls per step;
# bf16 matmul peak; eager img/s grid (precision x channels_last, batch 512, MFU); Trainer vs bare
# loop at batch 128; checkpoint save/load; two 50k epochs (cold, warm); 2 ranks over gloo on the one GPU WITH
# torch.compile (compile + DDP); the gcn_zca whitening fit on the device; a compiled Trainer with and without
# CUDA graphs; then compiled img/s configs while time is left.
# Output: ONE merged $OUT/gpu_check.json (rewritten after every section) and $OUT/gpu_check.log;
# per-section scratch JSON lives in a temp work dir. OUT unset: a temp folder.
# Time: a hard cap of GPU_CHECK_BUDGET_S (default 450 s on GPU) for the whole script: each section's
# timeout is clamped to what is left; a section that cannot get its minimum is skipped.
# Env: PYTHON (interpreter), OUT, GPU_CHECK_BUDGET_S, GPU_CHECK_SITE (wheel target, /tmp/site),
# GPU_CHECK_SECTIONS (section keys to run, e.g. "env,syncs,overhead,graphs"; default all; the rest: "omitted").
set -euo pipefail

MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --dry-run) MODE=dry ;;
    --fetch-wheels) MODE=fetch ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run, --fetch-wheels or nothing)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH="$ROOT/benchmarks"
WHL="$ROOT/.whl"
SITE="${GPU_CHECK_SITE:-/tmp/site}"
# shellcheck source=benchmarks/_device_env.sh
source "$BENCH/_device_env.sh"  # pick_python, use_checkout

# --fetch-wheels: pure-python wheels of what the GPU machine lacks (KINDS.md: it has torch, numpy,
# pyyaml, packaging, tqdm; not hydra-core, omegaconf, antlr4). The path gpu_check takes imports
# nothing else outside the standard library: submitit only in launcher.py and executor.py (`submit`), wandb only
# when wandb.mode != disabled (gpu_check always disables it), torchvision only to read real CIFAR.
fetch_wheels() {
  local py ver_h ver_o
  py="$(pick_python)"
  # the versions this checkout is tested with (the local interpreter's), else known-good pins
  ver_h="$("$py" -c "import importlib.metadata as m; print(m.version('hydra-core'))" 2>/dev/null || echo 1.3.8)"
  ver_o="$("$py" -c "import importlib.metadata as m; print(m.version('omegaconf'))" 2>/dev/null || echo 2.3.0)"
  case "$ver_h" in 1.3.*) ;; *) ver_h=1.3.8 ;; esac
  case "$ver_o" in 2.3.*) ;; *) ver_o=2.3.0 ;; esac
  echo "fetching pure-python wheels for Python 3.12 into $WHL: hydra-core==$ver_h omegaconf==$ver_o antlr4-python3-runtime==4.9.3"
  rm -rf "$WHL"
  mkdir -p "$WHL"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform any -d "$WHL" "hydra-core==$ver_h" "omegaconf==$ver_o"
  # 4.9.3 (hydra and omegaconf pin 4.9.*) is an sdist on PyPI: build the (pure-python) wheel here
  "$py" -m pip wheel -q --no-deps -w "$WHL" antlr4-python3-runtime==4.9.3
  local n bad
  n=$(find "$WHL" -type f -name '*.whl' | wc -l)
  bad=$(find "$WHL" -type f -name '*.whl' ! -name '*-none-any.whl' | wc -l)
  if (( n != 3 || bad != 0 )); then
    echo "FATAL: expected 3 pure-python (*-none-any) wheels in $WHL, got:" >&2; ls -l "$WHL" >&2; exit 1
  fi
  ls -l "$WHL"
  for w in "$WHL"/*.whl; do  # their needs: all in KINDS.md's list (PyYAML, packaging) or among these
    echo "  $(basename "$w"): $("$py" - "$w" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
reqs = [l.split(":", 1)[1].strip() for l in z.read(meta).decode().splitlines() if l.startswith("Requires-Dist:")]
print("needs " + (", ".join(r for r in reqs if "extra" not in r and "python_version" not in r) or "nothing"))
EOF
)"
  done
  # a trial install, the way the GPU machine does it (a throw-away target)
  local t
  t="$(mktemp -d -t allconv-whl-XXXX)"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$t" "$WHL"/*.whl
  (cd "$t" && PYTHONPATH="$t" "$py" -c "
import hydra, omegaconf, antlr4, sys
for m in (hydra, omegaconf, antlr4):
    assert m.__file__.startswith(sys.argv[1]), m.__file__
print('trial install ok: hydra', hydra.__version__, 'omegaconf', omegaconf.__version__, 'from', sys.argv[1])
" "$t")
  rm -rf "$t"
  if [[ -d "$ROOT/.git" ]] && ! grep -qxF '/.whl/' "$ROOT/.git/info/exclude" 2>/dev/null; then
    mkdir -p "$ROOT/.git/info" && echo '/.whl/' >> "$ROOT/.git/info/exclude"
    echo "added /.whl/ to .git/info/exclude"
  fi
  echo "done ($(du -sh "$WHL" | cut -f1)). On the GPU machine: name .whl in the run's carry, e.g."
  echo "  run(command='set -o pipefail; bash benchmarks/gpu_check.sh', carry=['.whl'], timeout_s=600)"
}

if [[ $MODE == fetch ]]; then
  fetch_wheels
  exit 0
fi

T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
header() { printf '\n==================== %s ====================\n' "$*"; }

main() {
  local PY WORK SECT STATUS RESULT
  PY="$(pick_python)"
  WORK="$(mktemp -d -t allconv-gpu-work-XXXX)"  # neutral cwd and per-section scratch, NOT under $OUT
  SECT="$WORK/sections"
  STATUS="$WORK/status.tsv"
  RESULT="$OUT_BASE/gpu_check.json"
  mkdir -p "$SECT"
  : > "$STATUS"
  trap 'rm -rf "$WORK"' EXIT
  export WANDB_MODE=disabled PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
  export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"  # one node, no network: no hostname lookup

  local BUDGET RESERVE=35  # the summary gets RESERVE - 5 s: torch + hydra + CUDA init
  BUDGET="${GPU_CHECK_BUDGET_S:-$([[ $MODE == dry ]] && echo 1800 || echo 450)}"

  header "setup"
  echo "repo: $ROOT"
  echo "python: $PY"
  echo "output: $RESULT (+ gpu_check.log); scratch: $WORK"
  echo "mode: $([[ $MODE == dry ]] && echo 'DRY RUN (CPU, tiny sizes)' || echo 'GPU'); time budget ${BUDGET} s"
  use_checkout "$PY" "$WORK" "$SITE"  # carried wheels (hydra-core, omegaconf, antlr4), this checkout's package
  if [[ $MODE == gpu ]] && [[ $CHECKOUT_CUDA != 1 ]]; then
    echo "FATAL: no CUDA device visible; use --dry-run on a CPU machine" >&2
    exit 1
  fi
  local -a DRYFLAG EXTRA
  local DEV BACKEND WIDTH NTRAIN BATCH
  if [[ $MODE == dry ]]; then
    DRYFLAG=(--dry-run); DEV=cpu; BACKEND=gloo; WIDTH=0.125; NTRAIN=256; BATCH=32; EXTRA=(trainer.threads=1)
  else
    DRYFLAG=(); DEV=cuda; BACKEND=nccl; WIDTH=1.0; NTRAIN=2048; BATCH=128; EXTRA=()
  fi

  local FAILED=0
  merge() {
    "$PY" "$BENCH/_gpu_merge.py" --sections "$SECT" --status "$STATUS" --out "$RESULT" \
      --meta "mode=$MODE" --meta "budget_s=$BUDGET" --meta "elapsed_s=$(elapsed)" --meta "$1" || true
  }
  # section NAME KEY NOMINAL_S MIN_S KILL_AFTER_S CMD...: run in $WORK under a timeout clamped to
  # the budget left (minus the summary's reserve and the kill grace); skip if under MIN_S; record
  # ok/FAIL/TIMEOUT/skipped; never abort; merge into gpu_check.json after each section.
  section() {
    local name="$1" key="$2" nominal="$3" min="$4" grace="$5"; shift 5
    header "$name"
    local left limit t0 rc=0 status=ok
    if [[ -n "${GPU_CHECK_SECTIONS:-}" && " ${GPU_CHECK_SECTIONS//,/ } " != *" $key "* ]]; then
      echo "omitted: $key is not in GPU_CHECK_SECTIONS ($GPU_CHECK_SECTIONS)"
      printf '%s\t%s\tomitted\t0\t0\n' "$name" "$key" >> "$STATUS"
      return 0
    fi
    # the limits are of a GPU; a 2-core CPU shared with other work took 58 s of whiten's 60 on 512 images (CI: ~10)
    [[ $MODE == dry ]] && nominal=$(( nominal * 3 ))
    left=$(( BUDGET - RESERVE - $(elapsed) - grace ))
    limit=$(( nominal < left ? nominal : left ))
    if (( limit < min )); then
      echo "skipped: $(elapsed) s elapsed, ${left} s left of the ${BUDGET} s budget < ${min} s this section needs"
      printf '%s\t%s\tskipped\t0\t%s\n' "$name" "$key" "$limit" >> "$STATUS"
      merge "state=running"
      return 0
    fi
    (( limit < nominal )) && echo "(timeout clamped to ${limit} s by the budget)"
    t0=$(date +%s)
    (cd "$WORK" && GPU_CHECK_SECTION_DEADLINE=$(( t0 + limit )) timeout --kill-after="$grace" "$limit" "$@") || rc=$?
    if (( rc == 124 || rc == 137 )); then status="TIMEOUT"; FAILED=1
    elif (( rc != 0 )); then status="FAIL($rc)"; FAILED=1; fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$key" "$status" $(( $(date +%s) - t0 )) "$limit" >> "$STATUS"
    echo "-> $name: $status in $(( $(date +%s) - t0 )) s (limit ${limit} s; ${BUDGET} s budget, $(elapsed) s used)"
    merge "state=running"
  }

  local -a GB TORCHRUN TRAIN_ARGS
  GB=("$PY" "$BENCH/gpu_bench.py" --out "$SECT" ${DRYFLAG[@]+"${DRYFLAG[@]}"})
  TORCHRUN=("$PY" -m torch.distributed.run --standalone --local-addr=127.0.0.1)
  TRAIN_ARGS=(data=synthetic "data.train_size=$NTRAIN" data.test_size=256 "model.width=$WIDTH"
              "trainer.batch_size=$BATCH" "trainer.device=$DEV" trainer.log_every_steps=4 trainer.progress=log
              checkpoint.every_steps=5 wandb.mode=disabled ${EXTRA[@]+"${EXTRA[@]}"})

  ddp_one_rank() {  # torchrun, 1 rank: train 1 epoch (checkpoints), then resume into epoch 2; with a
    # held-out split, so the run scores test once at the end and `evaluate` (CUDA) must agree with it
    local run="$WORK/run1"
    "${TORCHRUN[@]}" --nproc_per_node=1 -m allconv_hpc.cli train "${TRAIN_ARGS[@]}" "dist.backend=$BACKEND" \
      data.val_size=64 trainer.epochs=1 "hydra.run.dir=$run"
    test -s "$run/checkpoints/last.pt" || { echo "no checkpoint written in $run/checkpoints" >&2; return 1; }
    ls -l "$run/checkpoints"
    "${TORCHRUN[@]}" --nproc_per_node=1 -m allconv_hpc.cli train "${TRAIN_ARGS[@]}" "dist.backend=$BACKEND" \
      data.val_size=64 trainer.epochs=2 "hydra.run.dir=$run" 2>&1 | tee "$WORK/resume.log"
    grep -q "resumed from" "$WORK/resume.log" || { echo "second run did not resume" >&2; return 1; }
    grep -q "done: best val_acc" "$WORK/resume.log"
    "$PY" -m allconv_hpc.cli evaluate "$run" --checkpoint last --device "$DEV" --json > "$WORK/eval.json"
    "$PY" - "$run/status.json" "$WORK/eval.json" "$SECT/torchrun1.json" <<'EOF'
import json, math, sys
st, ev = (json.load(open(p)) for p in sys.argv[1:3])
json.dump({"evaluate": ev, "run_test_acc": st["test_acc"], "run_test_loss": st["test_loss"]}, open(sys.argv[3], "w"))
print(f"evaluate: {ev['split']} acc {ev['accuracy']:.4f} loss {ev['loss']:.4f} ({ev['images']} images, "
      f"{ev['precision']} on {ev['device']}); the run's own: acc {st['test_acc']:.4f} loss {st['test_loss']:.4f}")
assert abs(ev["accuracy"] - st["test_acc"]) <= 2 / ev["images"] + 1e-9, "evaluate disagrees with the run's test_acc"
assert math.isclose(ev["loss"], st["test_loss"], rel_tol=1e-3), "evaluate disagrees with the run's test_loss"
EOF
    echo "note: with WORLD_SIZE=1 the package takes its single-process path (no process group); the"
    echo "      'nccl-ddp' section runs the package's own NCCL group + DDP on one rank"
  }

  ddp_two_ranks_compiled() {  # 2 ranks sharing the one device over gloo (NCCL refuses 2 ranks on 1 GPU),
    local run="$WORK/run2"      # torch.compile on: the Trainer's compiled-DDP path end to end
    "${TORCHRUN[@]}" --nproc_per_node=2 -m allconv_hpc.cli train "${TRAIN_ARGS[@]}" dist.backend=gloo \
      trainer.epochs=1 trainer.compile=true "hydra.run.dir=$run" trainer.threads=1 2>&1 | tee "$WORK/ddp2.log" \
      || { echo "2-rank torchrun exited $?" >&2; return 1; }
    test -s "$run/checkpoints/last.pt" || { echo "no checkpoint written in $run/checkpoints" >&2; return 1; }
    grep -q "done: best val_acc" "$WORK/ddp2.log" || { echo "2-rank compiled run did not finish" >&2; return 1; }
    grep -q "compile: true" "$run/.hydra/config.yaml" || { echo "trainer.compile=true not in the run's config" >&2; return 1; }
    local graphs  # a compiled run that captured nothing runs eagerly: that is a failure here
    graphs=$(grep -o "torch.compile: [0-9]* graph" "$WORK/ddp2.log" | head -1 | grep -o "[0-9][0-9]*" || true)  # none: the check below
    [ "${graphs:-0}" -ge 1 ] || { echo "torch.compile captured no graph under DDP" >&2; return 1; }
    echo "2-rank gloo run with trainer.compile=true completed ($graphs graph(s)); checkpoint $(ls "$run/checkpoints" | tr '\n' ' ')"
    printf '{"ok": true, "ranks": 2, "backend": "gloo", "compile": true, "graphs": %s, "device": "%s"}\n' "$graphs" "$DEV" > "$SECT/ddp2_compile.json"
  }

  # -e: the child bash does not inherit errexit, and without it a failing step inside would pass
  local -a RUN1 RUN2
  RUN1=(bash -eo pipefail -c "$(declare -p TORCHRUN TRAIN_ARGS BACKEND WORK SECT PY DEV); $(declare -f ddp_one_rank); ddp_one_rank")
  RUN2=(bash -eo pipefail -c "$(declare -p TORCHRUN TRAIN_ARGS WORK SECT DEV); $(declare -f ddp_two_ranks_compiled); ddp_two_ranks_compiled")

  # name key nominal_s min_s kill_grace_s command; estimates on one H100/H200 are in README.md
  section "environment + FLOP count"             env          60  20 10 "${GB[@]}" env
  section "bf16/tf32/fp16 vs fp32 agreement"     correctness 120  40 10 "${GB[@]}" correctness
  section "trainer.deterministic=true, twice"    deterministic 60 20 10 "${GB[@]}" deterministic
  section "torchrun 1 rank: train+ckpt+resume"   torchrun1   120  40 30 "${RUN1[@]}"
  # 1 rank has no peer to reach over SHM/P2P, so disabling them costs nothing and spares a sandbox
  # with little /dev/shm space
  section "nccl-ddp (package's 1-rank group)"    nccl         90  25 10 env NCCL_DEBUG=WARN NCCL_SHM_DISABLE=1 NCCL_P2P_DISABLE=1 NCCL_SOCKET_IFNAME=lo "${GB[@]}" nccl
  section "CUDA syncs per Trainer step"          syncs        60  20 10 "${GB[@]}" syncs
  section "bf16 matmul peak"                     matmul       45  15 10 "${GB[@]}" matmul
  section "throughput grid, eager (+MFU)"        grid_eager  120  30 10 "${GB[@]}" grid
  # before the rest: the only compile + DDP check on CUDA (the TTA run compiles one rank only)
  # two ranks compile at once on 16 cores: 8 inductor compile workers each
  section "torchrun 2 ranks gloo + compile"      ddp2_compile 200 120 30 env TORCHINDUCTOR_COMPILE_THREADS=8 "${RUN2[@]}"
  section "Trainer vs bare loop, batch 128"      overhead     90  25 10 "${GB[@]}" overhead
  section "checkpoint save/load"                 checkpoint   90  20 10 "${GB[@]}" checkpoint
  section "gcn_zca whitening fit on the device"  whiten       60  25 10 "${GB[@]}" whiten
  section "two 50k epochs via fit()"             epoch       120  30 10 "${GB[@]}" epoch
  section "compiled Trainer, CUDA graphs or not" graphs      150  60 10 "${GB[@]}" graphs
  section "throughput grid, compiled (+MFU)"     grid_compiled 240 40 10 "${GB[@]}" grid --compiled

  header "summary"
  (cd "$WORK" && timeout --kill-after=3 $(( RESERVE - 5 )) "${GB[@]}" summary) || echo "(summary failed or timed out)"
  echo
  local name key status secs limit
  while IFS=$'\t' read -r name key status secs limit; do
    printf '%-36s %-9s %5ss  (limit %ss)\n' "$name" "$status" "$secs" "$limit"
  done < "$STATUS"
  merge "state=done"
  echo "total: $(elapsed) s of the ${BUDGET} s budget; merged JSON: $RESULT"
  if grep -q $'\tskipped\t' "$STATUS"; then
    echo "gpu_check: some sections were SKIPPED for time (see above)"
  fi
  if (( FAILED )); then
    echo "gpu_check: SOME SECTIONS FAILED" >&2
    return 1
  fi
  echo "gpu_check: all sections that ran passed"
}

OUT_BASE="${OUT:-$(mktemp -d -t allconv-gpu-check-XXXX)}"
mkdir -p "$OUT_BASE"
set -o pipefail
main 2>&1 | tee "$OUT_BASE/gpu_check.log"
exit "${PIPESTATUS[0]}"
