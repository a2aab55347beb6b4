# Sourced by gpu_check.sh and time_to_accuracy.sh: the interpreter, the carried wheels, and this
# checkout's package on the path. Needs ROOT (the repo) set by the caller.

pick_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    echo "$PYTHON"
  elif [[ -x "$ROOT/.venv/bin/python" ]] && "$ROOT/.venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "$ROOT/.venv/bin/python"
  else
    command -v python3 || command -v python
  fi
}

# use_checkout PY WORK SITE: install carried wheels (.whl: hydra-core, omegaconf, antlr4) into
# SITE, check the imports, and make `import allconv_hpc` this checkout's (an overlay in WORK when
# another copy is installed). Exits with one line naming the fix when something is missing.
use_checkout() {
  local py="$1" work="$2" site="$3" whl="$ROOT/.whl"
  if compgen -G "$whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$whl"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed $(ls "$whl" | tr '\n' ' ')into $site (on PYTHONPATH)"
  fi
  # the venv's editable install may point elsewhere: overlay with conf/ mapped to allconv_hpc.conf,
  # as pyproject's package-dir does (this probe imports no torch: it starts in a fraction of a second)
  if ! (cd "$work" && "$py" -c "import allconv_hpc.conf, os, sys; sys.exit(os.path.realpath(allconv_hpc.__file__) != os.path.realpath(sys.argv[1]))" "$ROOT/allconv_hpc/__init__.py") >/dev/null 2>&1; then
    mkdir -p "$work/overlay/allconv_hpc"
    for f in "$ROOT"/allconv_hpc/*.py; do ln -s "$f" "$work/overlay/allconv_hpc/"; done
    ln -sn "$ROOT/conf" "$work/overlay/allconv_hpc/conf"
    export PYTHONPATH="$work/overlay${PYTHONPATH:+:$PYTHONPATH}"
    echo "allconv_hpc of this checkout is not the installed one: using an overlay at $work/overlay"
  fi
  # one interpreter start for every import check (torch's import alone takes seconds of device time);
  # sets CHECKOUT_CUDA=1 when torch sees a CUDA device
  local rc=0
  (cd "$work" && "$py" -c '
import sys
try:
    import hydra, omegaconf
except ImportError:
    sys.exit(3)
try:
    import numpy, torch, yaml
except ImportError as e:
    print(e, file=sys.stderr)
    sys.exit(4)
import allconv_hpc.conf
print("allconv_hpc from", allconv_hpc.__file__)
print("hydra", hydra.__version__, "omegaconf", omegaconf.__version__, "from", hydra.__file__)
print("torch", torch.__version__, "cuda available:", torch.cuda.is_available())
sys.exit(0 if torch.cuda.is_available() else 5)
') || rc=$?
  case $rc in
    0) CHECKOUT_CUDA=1 ;;
    5) CHECKOUT_CUDA=0 ;;
    3) echo "FATAL: hydra-core/omegaconf missing for $py: run 'bash benchmarks/gpu_check.sh --fetch-wheels' where the package registry is reachable, and name .whl in the device run's carry" >&2
       exit 1 ;;
    4) echo "FATAL: $py lacks torch/numpy/pyyaml; set PYTHON=/path/to/python with them installed" >&2
       exit 1 ;;
    *) echo "FATAL: $py could not import this checkout's allconv_hpc (exit $rc, above)" >&2
       exit 1 ;;
  esac
}
