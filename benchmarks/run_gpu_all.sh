#!/usr/bin/env bash
# Every GPU benchmark in one prepared command, for the few minutes a GPU is lent:
#   bash benchmarks/run_gpu_all.sh              CUDA: bench_gpu.py (ours vs ComfyUI's stock nodes,
#                                               fp16/bf16) and bench_peers.py --gpu (ours vs the
#                                               peers' diffusers + PEFT path, fp16/bf16); each writes
#                                               its results file into benchmarks/results/
#   bash benchmarks/run_gpu_all.sh --cpu-smoke  plumbing check on a CPU: both scripts on the tiny
#                                               test model, nothing written to benchmarks/results/
# Environment: PYTHON (default: $PYTHON from .host/env, else python), STEP_TIMEOUT seconds per
# benchmark (default 420). bench_peers.py needs benchmarks/requirements-peers.txt installed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -f .host/env ]; then set -a; . .host/env; set +a; fi
PY=${PYTHON:-python}
STEP_TIMEOUT=${STEP_TIMEOUT:-420}
status=0

step() {  # step NAME COMMAND...: run with a time limit, remember a failure, go on with the next
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    timeout "$STEP_TIMEOUT" "$@"
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}

if ! "$PY" -c "import diffusers, peft, accelerate" 2>/dev/null; then
    echo "run_gpu_all.sh: diffusers/peft missing: $PY -m pip install -r benchmarks/requirements-peers.txt" >&2
    exit 2
fi

if [ "${1:-}" = "--cpu-smoke" ]; then
    step "bench_gpu (CPU smoke)" "$PY" benchmarks/bench_gpu.py --cpu-smoke
    step "bench_peers (CPU smoke)" "$PY" benchmarks/bench_peers.py --smoke --one-at-a-time
    exit $status
fi

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu_all.sh: no CUDA GPU visible; nothing was measured (use --cpu-smoke for the plumbing check)" >&2
    exit 3
fi
"$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
step bench_gpu "$PY" benchmarks/bench_gpu.py --runs 20 --warmup 3
step bench_peers "$PY" benchmarks/bench_peers.py --gpu --runs 10
ls -l benchmarks/results/gpu_*.md benchmarks/results/peers_gpu_*.md 2>/dev/null
exit $status
