#!/usr/bin/env bash
# The GPU check: on a CUDA machine, from the repository root, a few minutes in all.
#
#   bash scripts/gpu_check.sh        # or: make gpu-check
#
# Steps, each timed; a failed step does not stop the others, and the script exits 1 if any failed:
#   gpu          nvidia-smi, and what torch sees
#   pytest-gpu   python -m pytest -m gpu (tests/test_gpu.py: the engine's FFT and GEMM forms, a
#                streamed file, NCCL all-reduce, the MNIST prior's score, reconstruct(cfg), each on
#                the GPU against the CPU)
#   main         python reconstruct.py logger=none device=cuda dtype=float32 (the main job)
#   bench-em     python -m tests.benchmarks.bench_em --device cuda --dtype float32
#   bench-scale  python -m tests.benchmarks.bench_scale --device cuda (skipped while it has no
#                --device flag: on the CPU it would time the wrong machine)
#   ddp-nccl     reconstruct.py launcher=ddp launcher.accelerator=gpu (Fabric, NCCL) on
#                min(2, GPUs) processes, one per GPU: NCCL refuses two ranks on one GPU, so a
#                one-GPU machine runs one rank (Fabric's launch, NCCL's process group, the device
#                placement) and the errors must equal the main job's; two GPUs run the all-reduce
#                across processes, within 1e-3 of the main job. Two gloo processes against one
#                are tests/engine/test_scale.py's, on the CPU.
#
# Output: ${OUT:-gpu_check_out}/ gets summary.txt (one line per step: PASS/FAIL/SKIP, seconds),
# log.txt (everything printed), main_summary.json, main_reconstruction.png, ddp_summary.json;
# the Hydra run folders go to a temporary folder (a device tool brings back only a few files).
#
# Set-up: the virtual environment $VENV (default .venv) if it exists; else `make install`. On a
# GPU image whose python3 already holds CUDA torch (and no registry can be reached) the venv is
# made over it (SYSTEM_SITE=1) and pip installs, offline, the wheels in .gpu-wheels/ of what
# the image lacks (made beforehand by `make gpu-wheels` on a machine with a registry; carry it).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu_check_out}
VENV=${VENV:-.venv}
WHEELS=${GPU_WHEELS:-.gpu-wheels}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1
RUNS=$(mktemp -d)
trap 'rm -rf "$RUNS"' EXIT

# ------------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------------
setup() {
    echo "=== set-up ($(date -u +%H:%M:%S) UTC) ==="
    t0=$(date +%s)
    if [ ! -x "$VENV/bin/python" ]; then
        command -v make >/dev/null || { echo "no $VENV and no make to set it up"; return 1; }
        if python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
            if [ -d "$WHEELS" ]; then
                # Offline: the wheels of what the image lacks; everything else is the image's
                # own. The project itself is not installed (building it would need the image's
                # setuptools to be recent enough): every step runs from the repository root,
                # where mtd, priors and tasks import as they are.
                make install VENV="$VENV" SYSTEM_SITE=1 \
                    PIP_ARGS="--no-index --no-deps --find-links $WHEELS" \
                    INSTALL="$(echo "$WHEELS"/*.whl)"
            else
                # A registry in reach: the image's CUDA torch satisfies the bounds and stays.
                make install VENV="$VENV" SYSTEM_SITE=1
            fi
        else
            make install VENV="$VENV"
        fi
    fi
    PY=$VENV/bin/python
    "$PY" - <<'EOF'
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA GPU: this check needs one")
for name in ("hydra", "omegaconf", "lightning", "mrcfile", "mtd", "priors", "pytest"):
    __import__(name)
EOF
    echo "set-up: $(($(date +%s) - t0)) s"
}

# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------
step() {  # step NAME COMMAND...: run it, time it, record PASS/FAIL
    local name=$1
    shift
    echo
    echo "=== $name: $* ($(date -u +%H:%M:%S) UTC) ==="
    local start status
    start=$(date +%s.%N)
    if "$@"; then status=PASS; else status="FAIL($?)" && FAILED=1; fi
    awk -v n="$name" -v s="$status" -v a="$start" -v b="$(date +%s.%N)" \
        'BEGIN { printf "%-12s %-8s %7.1f s\n", n, s, b - a }' | tee -a "$OUT/summary.txt"
}

skip() {  # skip NAME REASON
    echo
    echo "=== $1: skipped: $2 ==="
    printf '%-12s %-8s %s\n' "$1" SKIP "$2" | tee -a "$OUT/summary.txt"
}

gpu_info() {
    nvidia-smi
    "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'GPUs', torch.cuda.device_count(), torch.cuda.get_device_name(0))"
}

main_job() {
    "$PY" reconstruct.py logger=none device=cuda dtype=float32 hydra.run.dir="$RUNS/main" ||
        return
    cp "$RUNS/main/summary.json" "$OUT/main_summary.json" || return
    cp "$RUNS/main/reconstruction.png" "$OUT/main_reconstruction.png" || return
    "$PY" - "$OUT/main_summary.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json
import sys

m = json.load(open(sys.argv[1]))["metrics"]
print("main job, relative error:", *(f"{v} {m['error/' + v]:.4f}" for v in ("init", "no_prior", "prior")))
EOF
}

ddp_nccl() {  # ddp_nccl DEVICES
    "$PY" reconstruct.py launcher=ddp launcher.accelerator=gpu launcher.devices="$1" \
        dtype=float32 logger=none hydra.run.dir="$RUNS/ddp" || return
    cp "$RUNS/ddp/summary.json" "$OUT/ddp_summary.json" || return
    # The same measurement and initial guess: one rank must give the main job's errors (up to
    # the GPU's atomic-add order), two ranks (another summation order of the statistics) the
    # same to float32 rounding.
    "$PY" - "$OUT/main_summary.json" "$OUT/ddp_summary.json" "$1" <<'EOF'
import json
import sys

main, ddp = (json.load(open(p))["metrics"] for p in sys.argv[1:3])
tol = 1e-4 if sys.argv[3] == "1" else 2e-3
keys = [k for k in main if k.startswith("error/")]
bad = {k: (main[k], ddp.get(k)) for k in keys if not abs(main[k] - ddp.get(k, float("inf"))) <= tol}
print({k: round(ddp[k], 4) for k in keys if k in ddp})
sys.exit(f"launcher=ddp errors differ from the main job's by more than {tol}: {bad}" if bad else 0)
EOF
}

checks() {
    FAILED=0
    step gpu gpu_info
    step pytest-gpu "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider
    step main main_job
    step bench-em "$PY" -m tests.benchmarks.bench_em --device cuda --dtype float32
    # (grep without -q reads all of the help: -q would stop the pipe early, failing it)
    if "$PY" -m tests.benchmarks.bench_scale --help | grep -- --device >/dev/null; then
        step bench-scale "$PY" -m tests.benchmarks.bench_scale --device cuda
    else
        skip bench-scale "tests/benchmarks/bench_scale.py has no --device flag"
    fi
    GPUS=$("$PY" -c "import torch; print(min(2, torch.cuda.device_count()))")
    if [ -f "$OUT/main_summary.json" ]; then
        step ddp-nccl ddp_nccl "$GPUS"
    else
        skip ddp-nccl "the main job wrote no summary to compare with"
    fi

    echo
    echo "=== summary ($OUT/summary.txt) ==="
    cat "$OUT/summary.txt"
    return "$FAILED"
}

# Everything printed also goes to $OUT/log.txt; the exit status is the checks' (set-up failing: 1).
{ setup; checks; } 2>&1 | tee "$OUT/log.txt"
